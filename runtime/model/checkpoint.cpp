// Trainer checkpoints: the model in Hugging Face DeepSeek safetensors shards written by the ranks
// that hold each tensor, the optimiser's moments beside them, and the training state, made visible
// all at once by a rename.
#include <exception>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/trace.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/io/hf_layer.h"
#include "runtime/io/json_guard.h"
#include "runtime/io/safetensors.h"
#include "runtime/model/trainer.h"

namespace moex {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFormat = "moex-checkpoint";
constexpr int kVersion = 1;
constexpr const char* kSumKey = "fnv1a64w";  // Checksum (checkpoint_files.h): FNV-1a 64 over 64-bit words

/// `dir`/`file` mapped into memory and checked against its entry in the folder's checksums.json
/// (`sums`): size and checksum; IoError naming the file and what differs.
FileBytes verified_file(const fs::path& dir, const json& sums, const std::string& file) {
  const fs::path f = dir / file;
  if (!sums.contains(file)) throw IoError((dir / "checksums.json").string() + " lists no checksum for " + file);
  const auto& s = sums.at(file);
  if (!fs::exists(f)) throw IoError(f.string() + " is missing (the checkpoint lists it)");
  FileBytes bytes = map_file(f.string());  // the size the mapping has: one stat, of the file read
  if (bytes.size != s.at("bytes").get<std::uint64_t>())
    throw IoError(f.string() + " has " + std::to_string(bytes.size) + " bytes, the checkpoint says " +
                  std::to_string(s.at("bytes").get<std::uint64_t>()));
  Checksum sum;
  sum.update(bytes.data.get(), bytes.size);
  if (sum.hex() != s.at(kSumKey).get<std::string>())
    throw IoError(f.string() + ": checksum " + sum.hex() + " differs from the saved " +
                  s.at(kSumKey).get<std::string>() + " (the file changed or is damaged)");
  return bytes;
}

std::string mlp_prefix(std::size_t layer) { return "model.layers." + std::to_string(layer) + ".mlp."; }

/// One tensor of a parameter block: its Hugging Face name and shape, and where it lives.
struct Slice {
  std::string name;
  std::vector<std::int64_t> shape;
  ParamBlock* block;
  std::int64_t offset;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// The replicated tensors (every rank holds them): each layer's norm, gate and shared experts.
std::vector<Slice> replicated_slices(MoeModel& model, const MoeConfig& c) {
  const std::int64_t H = c.hidden_size, E = c.n_routed_experts, Fs = c.shared_intermediate_size();
  std::vector<Slice> out;
  auto& layers = model.layers();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    MoELayer& l = *layers[i];
    const std::string p = mlp_prefix(i);
    out.push_back({"model.layers." + std::to_string(i) + ".post_attention_layernorm.weight", {H}, &model.norms(),
                   static_cast<std::int64_t>(i) * H});
    out.push_back({p + "gate.weight", {E, H}, &l.replicated(), 0});
    if (Fs > 0) {
      out.push_back({p + "shared_experts.gate_proj.weight", {Fs, H}, &l.replicated(), l.shared_w13_offset()});
      out.push_back({p + "shared_experts.up_proj.weight", {Fs, H}, &l.replicated(), l.shared_w13_offset() + Fs * H});
      out.push_back({p + "shared_experts.down_proj.weight", {H, Fs}, &l.replicated(), l.shared_w2_offset()});
    }
  }
  return out;
}

/// The rank, slot that writes expert e: its first replica in (rank, slot) order.
std::pair<int, std::int64_t> writer_of(const MoELayer& l, std::int64_t e, int world) {
  for (int r = 0; r < world; ++r) {
    const auto slots = l.slot_experts(r);
    for (std::size_t s = 0; s < slots.size(); ++s)
      if (slots[s] == e) return {r, static_cast<std::int64_t>(s)};
  }
  throw InternalError(l.name() + ": expert " + std::to_string(e) + " is held by no rank");
}

/// The expert tensors of `rank`'s slots: every slot (loading), or only the slots that write their
/// expert (saving: each expert once).
std::vector<Slice> expert_slices(MoeModel& model, const MoeConfig& c, int rank, int world, bool writers_only) {
  const std::int64_t H = c.hidden_size, F = c.moe_intermediate_size;
  std::vector<Slice> out;
  auto& layers = model.layers();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    MoELayer& l = *layers[i];
    const auto mine = l.slot_experts(rank);
    for (std::size_t s = 0; s < mine.size(); ++s) {
      const std::int64_t e = mine[s], base = static_cast<std::int64_t>(s) * l.expert_stride();
      if (writers_only && writer_of(l, e, world) != std::pair<int, std::int64_t>{rank, static_cast<std::int64_t>(s)})
        continue;
      const std::string p = mlp_prefix(i) + "experts." + std::to_string(e) + ".";
      out.push_back({p + "gate_proj.weight", {F, H}, &l.experts(), base});
      out.push_back({p + "up_proj.weight", {F, H}, &l.experts(), base + F * H});
      out.push_back({p + "down_proj.weight", {H, F}, &l.experts(), base + 2 * F * H});
    }
  }
  return out;
}

std::string bias_name(std::size_t layer) { return mlp_prefix(layer) + "gate.e_score_correction_bias"; }

json layout_json(const sched::ReplicaLayout& l) { return l.slot_expert(); }

json schedule_json(const MoELayer& l) {
  const ScheduleChoice& c = l.schedule_choice();
  const bool fixed = !c.automatic || c.decided;
  return {{"fixed", fixed}, {"chunks", c.schedule.chunks}, {"local_first", c.schedule.local_first},
          {"local_split", c.schedule.local_split}};
}

template <typename T>
T get(const json& j, const char* key, const std::string& file) {
  if (!j.is_object() || !j.contains(key)) throw IoError(file + ": key '" + key + "' missing");
  try {
    return j.at(key).get<T>();
  } catch (const json::exception& e) {
    throw IoError(file + ": key '" + key + "' has the wrong type (" + e.what() + ")");
  }
}

}  // namespace

void Trainer::agree(const std::string& what, std::exception_ptr error) {
  // Every rank learns whether any failed, so they all stop together; the failing rank's own error
  // says why, the others name it.
  std::int64_t v = error ? comm_.rank() + 1 : 0;
  comm_.allreduce_max(&v, 1, comm::DataType::kInt64, what)->wait();
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const fs::filesystem_error& e) {  // libstdc++'s text names neither the checkpoint nor the step
      throw IoError(what + ": " + e.code().message() + " (" + e.path1().string() + ")");
    }
  }
  if (v > 0) throw IoError(what + " failed on rank " + std::to_string(v - 1) + " (its own error says why)");
}

std::string Trainer::save_checkpoint(const std::string& dir, std::int64_t keep) {
  trace::Scope span("checkpoint save");
  const int me = comm_.rank(), P = comm_.size();
  const std::string name = step_folder(step_);
  const fs::path final_dir = fs::path(dir) / name, tmp = fs::path(dir) / ("." + name + ".tmp");
  const std::string what = "checkpoint save " + final_dir.string();
  // A replica plan in flight is finished first, so that the state saved holds its layouts.
  if (plan_pending_) planned_.wait(std::chrono::steady_clock::now() + comm_.default_timeout(), "replica planner");
  std::exception_ptr error;
  if (me == 0) {
    try {
      fs::create_directories(dir);
      fs::remove_all(tmp);  // a save that crashed before its rename
      fs::create_directories(tmp);
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree(what, error);

  // Every rank writes the tensors it holds: shard 1 of P + 1 the replicated ones (rank 0), shard
  // r + 2 the experts whose first replica rank r holds. A loading rank then reads the small shard
  // of the replicated tensors and the shards of its own experts, nothing else.
  try {
    const std::map<std::string, std::string> meta{{"format", "pt"}};
    json sums = json::object();
    auto write_shard = [&](int shard, const std::vector<Slice>& slices, bool with_bias) {
      // Views of the parameters and moments where they live: written without copies, the checksum
      // computed as the bytes go out.
      std::vector<TensorView> model, state;
      for (const Slice& s : slices) {
        model.push_back({s.name, s.shape, s.block->value.data() + s.offset, s.numel()});
        const auto m = optimizer_.moments(s.block);
        state.push_back({s.name + ".exp_avg", s.shape, m[0]->data() + s.offset, s.numel()});
        state.push_back({s.name + ".exp_avg_sq", s.shape, m[1]->data() + s.offset, s.numel()});
      }
      auto& layers = student_->layers();
      for (std::size_t i = 0; with_bias && i < layers.size(); ++i)
        if (!layers[i]->selection_bias().empty())
          model.push_back({bias_name(i), {config_.n_routed_experts}, layers[i]->selection_bias().data(),
                           config_.n_routed_experts});
      for (auto [stem, tensors] : {std::pair{"model", &model}, std::pair{"trainer", &state}}) {
        const std::string file = shard_name(stem, shard, P + 1), path = (tmp / file).string();
        const std::string sum = write_safetensors(path, *tensors, meta);
        sums[file] = {{"bytes", fs::file_size(path)}, {kSumKey, sum}};
      }
    };
    if (me == 0) write_shard(0, replicated_slices(*student_, config_), true);
    write_shard(me + 1, expert_slices(*student_, config_, me, P, true), false);
    write_file_atomic((tmp / ("sums-" + std::to_string(me) + ".json")).string(), sums.dump());
  } catch (...) {
    error = std::current_exception();
  }
  agree(what, error);

  if (me == 0) {
    try {
      // The index (every tensor's shard), the config, the training state; then every file's checksum.
      json weight_map = json::object();
      std::int64_t total = 0;
      for (const Slice& s : replicated_slices(*student_, config_)) {
        weight_map[s.name] = shard_name("model", 0, P + 1);
        total += s.numel() * 4;
      }
      auto& layers = student_->layers();
      for (std::size_t i = 0; i < layers.size(); ++i)
        if (!layers[i]->selection_bias().empty()) weight_map[bias_name(i)] = shard_name("model", 0, P + 1);
      for (int r = 0; r < P; ++r)
        for (const Slice& s : expert_slices(*student_, config_, r, P, true)) {
          weight_map[s.name] = shard_name("model", r + 1, P + 1);
          total += s.numel() * 4;
        }
      write_file_atomic((tmp / "model.safetensors.index.json").string(),
                        json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(1));
      json cfg = config_.to_json();
      cfg["architectures"] = {"DeepseekV3ForCausalLM"};
      write_file_atomic((tmp / "config.json").string(), cfg.dump(1));

      json st;
      st["format"] = kFormat;
      st["version"] = kVersion;
      st["step"] = step_;
      st["seed"] = options_.seed;
      st["world_size"] = P;
      st["tokens_per_rank"] = options_.tokens_per_rank;
      st["config"] = config_.to_json();
      st["adam_step"] = optimizer_.steps();
      json sched = json::object();
      for (auto [who, m] : {std::pair{"teacher", teacher_.get()}, std::pair{"student", student_.get()}}) {
        json list = json::array();
        for (const auto& l : m->layers()) list.push_back(schedule_json(*l));
        sched[who] = list;
      }
      st["schedules"] = sched;
      if (options_.replicas.enabled) {
        json rep;
        json layouts = json::array(), trackers = json::array(), planned = json::array();
        for (const auto& l : layers) layouts.push_back(layout_json(*l->replica_layout()));
        for (const auto& t : trackers_) trackers.push_back({{"steps", t.steps()}, {"estimate", t.estimate()}});
        for (const auto& l : planned_layouts_) planned.push_back(layout_json(l));
        rep["layouts"] = layouts;
        rep["trackers"] = trackers;
        rep["plan_pending"] = plan_pending_;
        rep["apply_at"] = apply_at_;
        rep["planned"] = planned;
        st["replicas"] = rep;
      }
      write_file_atomic((tmp / "trainer_state.json").string(), st.dump(1));

      json sums = json::object();
      for (int r = 0; r < P; ++r) {
        const fs::path f = tmp / ("sums-" + std::to_string(r) + ".json");
        const json part = json::parse(read_file(f.string()));
        for (auto& [k, v] : part.items()) sums[k] = v;
        fs::remove(f);
      }
      for (const char* f : {"model.safetensors.index.json", "config.json", "trainer_state.json"})
        sums[f] = {{"bytes", fs::file_size(tmp / f)}, {kSumKey, file_checksum((tmp / f).string())}};
      write_file_atomic((tmp / "checksums.json").string(), sums.dump(1));
      fsync_path(tmp.string());

      // Visible at once: the rename. A checkpoint of the same step saved before moves aside first.
      const fs::path old = fs::path(dir) / ("." + name + ".old");
      fs::remove_all(old);
      if (fs::exists(final_dir)) fs::rename(final_dir, old);
      fs::rename(tmp, final_dir);
      fsync_path(dir);
      write_file_atomic((fs::path(dir) / "latest").string(), name + "\n");
      fs::remove_all(old);
      if (keep > 0) {
        const auto all = list_checkpoints(dir);
        for (std::size_t i = 0; i + static_cast<std::size_t>(keep) < all.size(); ++i) fs::remove_all(all[i]);
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree(what, error);
  return final_dir.string();
}

void Trainer::load_checkpoint(const std::string& path) {
  trace::Scope span("checkpoint load");
  const int me = comm_.rank(), P = comm_.size();
  std::exception_ptr error;
  std::string at = path;
  try {
    at = resolve_checkpoint(path);
    const fs::path dir(at);
    const json sums = parse_json_guarded(read_file((dir / "checksums.json").string()), (dir / "checksums.json").string());
    // Every file is mapped into memory once and checked against its checksum there: what is parsed
    // is what was verified, and its pages come from disk once.
    auto verified = [&](const std::string& file) { return verified_file(dir, sums, file); };
    const std::string state_path = (dir / "trainer_state.json").string();
    const json st = parse_json_guarded(std::string(verified("trainer_state.json").view()), state_path);
    verified("config.json");  // not read here (the state holds the config), but part of a complete checkpoint
    if (get<std::string>(st, "format", state_path) != kFormat || get<int>(st, "version", state_path) != kVersion)
      throw IoError(state_path + ": not a moex checkpoint of version " + std::to_string(kVersion));
    // The model must be the one saved: every config field, and the seed (it defines the teacher).
    const json saved = get<json>(st, "config", state_path), ours = config_.to_json();
    for (auto& [k, v] : ours.items())
      if (!saved.contains(k) || saved.at(k) != v)
        throw ConfigError(state_path + ": the checkpoint's model has " + k + " = " +
                          (saved.contains(k) ? saved.at(k).dump() : std::string("(absent)")) + ", this run " + v.dump());
    if (get<std::uint64_t>(st, "seed", state_path) != options_.seed)
      throw ConfigError(state_path + ": saved with --seed " + std::to_string(get<std::uint64_t>(st, "seed", state_path)) +
                        ", this run has " + std::to_string(options_.seed) + " (the seed defines the teacher)");
    const int saved_world = get<int>(st, "world_size", state_path);
    const std::int64_t step = get<std::int64_t>(st, "step", state_path);
    auto& layers = student_->layers();

    // Replicas: the load trackers (global numbers, valid at any world size); the layouts first (the
    // tensors then load into the slots they give) and a plan in flight at the saved world size,
    // while at another each layer keeps this run's starting layout.
    const bool replicas = options_.replicas.enabled && st.contains("replicas");
    if (replicas) {
      const auto trackers = st.at("replicas").at("trackers");
      for (std::size_t i = 0; i < trackers_.size() && i < trackers.size(); ++i)
        trackers_[i].restore(trackers[i].at("estimate").get<std::vector<double>>(),
                             trackers[i].at("steps").get<std::int64_t>());
    }
    if (replicas && saved_world == P) {
      const json& rep = st.at("replicas");
      const auto layouts = rep.at("layouts");
      if (layouts.size() != layers.size()) throw IoError(state_path + ": replica layouts for the wrong number of layers");
      for (std::size_t i = 0; i < layers.size(); ++i) {
        auto to = sched::ReplicaLayout::from_slots(config_.n_routed_experts,
                                                   layouts[i].get<std::vector<std::vector<std::int64_t>>>());
        auto m = optimizer_.moments(&layers[i]->experts());
        std::vector<std::vector<float>*> state{m[0], m[1]};
        layers[i]->set_replica_layout(to, state);
      }
      if (rep.at("plan_pending").get<bool>()) {
        std::vector<sched::ReplicaLayout> planned;
        for (const auto& l : rep.at("planned"))
          planned.push_back(sched::ReplicaLayout::from_slots(config_.n_routed_experts,
                                                             l.get<std::vector<std::vector<std::int64_t>>>()));
        planned_.reset();
        planner_->enqueue([this, planned = std::move(planned)]() mutable { planned_layouts_ = std::move(planned); },
                          &planned_);
        plan_pending_ = true;
        apply_at_ = rep.at("apply_at").get<std::int64_t>();
      }
    }

    // The tensors this rank holds, from whichever shard the index names (any saved world size).
    const std::string index_path = (dir / "model.safetensors.index.json").string();
    const json weight_map =
        get<json>(parse_json_guarded(std::string(verified("model.safetensors.index.json").view()), index_path), "weight_map", index_path);
    std::map<std::string, SafetensorsFile> files;
    auto file_of = [&](const std::string& tensor, bool moments) -> const SafetensorsFile& {
      if (!weight_map.contains(tensor)) throw IoError(index_path + " names no shard for tensor " + tensor);
      std::string f = weight_map.at(tensor).get<std::string>();
      if (moments) {
        if (f.rfind("model-", 0) != 0) throw IoError(index_path + ": shard " + f + " is not named model-*");
        f = "trainer-" + f.substr(6);
      }
      auto it = files.find(f);
      if (it == files.end()) it = files.emplace(f, SafetensorsFile::from_bytes(verified(f), (dir / f).string())).first;
      return it->second;
    };
    std::vector<Slice> slices = replicated_slices(*student_, config_);
    for (const Slice& s : expert_slices(*student_, config_, me, P, false)) slices.push_back(s);
    for (const Slice& s : slices) {
      const auto v = file_of(s.name, false).read_f32(s.name, s.shape);
      std::copy(v.begin(), v.end(), s.block->value.begin() + s.offset);
      const auto m = optimizer_.moments(s.block);
      const SafetensorsFile& f = file_of(s.name, true);
      const auto m1 = f.read_f32(s.name + ".exp_avg", s.shape), m2 = f.read_f32(s.name + ".exp_avg_sq", s.shape);
      std::copy(m1.begin(), m1.end(), m[0]->begin() + s.offset);
      std::copy(m2.begin(), m2.end(), m[1]->begin() + s.offset);
    }
    for (std::size_t i = 0; i < layers.size(); ++i) {
      if (weight_map.contains(bias_name(i)))
        layers[i]->selection_bias() = file_of(bias_name(i), false).read_f32(bias_name(i), {config_.n_routed_experts});
      else
        layers[i]->selection_bias().clear();
    }
    // The schedules that were fixed (explicit, or chosen by auto) stay: the same rounding as the
    // run that saved. A layer whose auto had not chosen yet measures again.
    const json& sched = get<json>(st, "schedules", state_path);
    for (auto [who, m] : {std::pair{"teacher", teacher_.get()}, std::pair{"student", student_.get()}}) {
      const json list = get<json>(sched, who, state_path);
      auto& ls = m->layers();
      for (std::size_t i = 0; i < ls.size() && i < list.size(); ++i) {
        if (!list[i].at("fixed").get<bool>()) continue;
        LayerOptions o = ls[i]->options();
        o.chunks = list[i].at("chunks").get<int>();
        o.local_first = list[i].at("local_first").get<bool>();
        o.local_split = list[i].value("local_split", false);  // absent before local-split existed
        ls[i]->set_options(o);
      }
    }
    optimizer_.set_steps(get<std::int64_t>(st, "adam_step", state_path));
    step_ = step;
    student_->parameters_changed();
  } catch (const json::exception& e) {
    error = std::make_exception_ptr(IoError("checkpoint " + at + ": malformed JSON: " + e.what()));
  } catch (...) {
    error = std::current_exception();
  }
  agree("checkpoint load " + at, error);
}

void Trainer::init_from(const std::string& path) {
  std::exception_ptr error;
  try {
    // A moex checkpoint's model shards carry checksums: verified before they are read (a Hugging Face
    // folder has none).
    const fs::path folder = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
    if (fs::exists(folder / "checksums.json")) {
      const json sums = parse_json_guarded(read_file((folder / "checksums.json").string()),
                                           (folder / "checksums.json").string());
      if (!sums.is_object()) throw IoError((folder / "checksums.json").string() + ": expected an object of files");
      for (const auto& [file, entry] : sums.items())
        if (file.rfind("model", 0) == 0) verified_file(folder, sums, file);
    }
    const HfCheckpoint ckpt = HfCheckpoint::open(path);
    const auto prefixes = ckpt.moe_prefixes();
    auto& layers = student_->layers();
    if (prefixes.size() < layers.size())
      throw IoError(ckpt.path() + " holds " + std::to_string(prefixes.size()) + " MoE layers (model.layers.N.mlp.gate" +
                    ".weight); the model has num_hidden_layers = " + std::to_string(layers.size()));
    const std::int64_t H = config_.hidden_size;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      load_hf_layer(*layers[i], ckpt, prefixes[i]);
      const std::string block = prefixes[i].substr(0, prefixes[i].size() - 4);  // "model.layers.N."
      const std::string norm = block + "post_attention_layernorm.weight";
      if (ckpt.contains(norm)) {
        const auto v = ckpt.read_weight(norm, {H});
        std::copy(v.begin(), v.end(), student_->norms().value.begin() + static_cast<std::int64_t>(i) * H);
      }
    }
    student_->parameters_changed();
  } catch (const json::exception& e) {
    error = std::make_exception_ptr(IoError("--init-from " + path + ": malformed checksums.json: " + e.what()));
  } catch (...) {
    error = std::current_exception();
  }
  agree("--init-from " + path, error);
}

}  // namespace moex
