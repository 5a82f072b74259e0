// Bad inputs become clear errors: every config rule, and malformed safetensors files (with a fuzz loop).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>

#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include "base/error.h"
#include "runtime/io/moe_config.h"
#include "runtime/random.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/io/hf_checkpoint.h"
#include "runtime/io/safetensors.h"

namespace moex {
namespace {
using nlohmann::json;

json base_config() {
  return json{{"model_type", "deepseek_v3"}, {"hidden_size", 16}, {"moe_intermediate_size", 8},
              {"n_routed_experts", 8}, {"n_shared_experts", 1}, {"num_experts_per_tok", 2},
              {"n_group", 4}, {"topk_group", 2}, {"topk_method", "noaux_tc"}, {"scoring_func", "sigmoid"},
              {"norm_topk_prob", true}, {"routed_scaling_factor", 2.5}};
}

struct Rule {
  json patch;
  const char* expect;  ///< a substring the message must hold (field and value)
};

class ConfigRules : public ::testing::TestWithParam<Rule> {};

TEST_P(ConfigRules, RejectedWithFieldAndValue) {
  json j = base_config();
  j.merge_patch(GetParam().patch);
  try {
    MoeConfig::from_json(j);
    FAIL() << "accepted " << GetParam().patch.dump();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(GetParam().expect), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Each, ConfigRules,
    ::testing::Values(Rule{{{"hidden_size", 0}}, "hidden_size = 0"}, Rule{{{"hidden_size", "big"}}, "hidden_size = \"big\""},
                      Rule{{{"hidden_size", 2.5}}, "hidden_size = 2.5"}, Rule{{{"moe_intermediate_size", -1}}, "moe_intermediate_size = -1"},
                      Rule{{{"n_routed_experts", 0}}, "n_routed_experts = 0"}, Rule{{{"n_shared_experts", -2}}, "n_shared_experts = -2"},
                      Rule{{{"num_experts_per_tok", 9}}, "num_experts_per_tok = 9"}, Rule{{{"num_experts_per_tok", 0}}, "num_experts_per_tok = 0"},
                      Rule{{{"n_group", 3}}, "n_group = 3"}, Rule{{{"topk_group", 5}}, "topk_group = 5"},
                      Rule{{{"topk_group", 1}, {"num_experts_per_tok", 3}}, "num_experts_per_tok = 3"},
                      Rule{{{"n_group", 8}, {"topk_group", 2}}, "n_group = 8"},
                      Rule{{{"routed_scaling_factor", 0}}, "routed_scaling_factor = 0"},
                      Rule{{{"scoring_func", "relu"}}, "scoring_func = \"relu\""}, Rule{{{"topk_method", "best"}}, "topk_method = \"best\""},
                      Rule{{{"norm_topk_prob", 1}}, "norm_topk_prob = 1"}, Rule{{{"model_type", "llama"}}, "model_type = \"llama\""}));

TEST(Config, ModelTypeDefaultsAndNulls) {
  const MoeConfig v3 = MoeConfig::from_json(json{{"hidden_size", 32}, {"moe_intermediate_size", 8}});
  EXPECT_EQ(v3.topk_method, TopkMethod::kNoauxTc);
  EXPECT_DOUBLE_EQ(v3.routed_scaling_factor, 2.5);
  const MoeConfig v2 = MoeConfig::from_json(json{{"model_type", "deepseek_v2"}, {"n_routed_experts", 64}, {"n_shared_experts", 2},
                                                 {"num_experts_per_tok", 6}, {"n_group", nullptr}, {"topk_method", "gready"}});
  EXPECT_EQ(v2.scoring_func, ScoringFunc::kSoftmax);
  EXPECT_EQ(v2.n_group, 1);
  EXPECT_EQ(v2.topk_method, TopkMethod::kGreedy);
  EXPECT_DOUBLE_EQ(v2.routed_scaling_factor, 1.0);
  const MoeConfig m16 = MoeConfig::from_json(json{{"model_type", "deepseek"}, {"n_routed_experts", 64}, {"n_shared_experts", 2}, {"num_experts_per_tok", 6}});
  EXPECT_DOUBLE_EQ(m16.routed_scaling_factor, 1.0);
  EXPECT_FALSE(m16.norm_topk_prob);
  EXPECT_THROW(MoeConfig::from_json(json{{"model_type", "deepseek_v2"}}), ConfigError);  // n_routed_experts is null in HF
  EXPECT_EQ(MoeConfig::from_json(v2.to_json()).to_json(), v2.to_json());
  EXPECT_THROW(MoeConfig::from_file(::testing::TempDir() + "/no-such-config.json"), IoError);
  const std::string bad = ::testing::TempDir() + "/bad-config.json";
  std::ofstream(bad) << "{ \"hidden_size\": ";
  EXPECT_THROW(MoeConfig::from_file(bad), ConfigError);
}

// ---- safetensors ----

std::string write_raw(const std::string& name, const std::string& header, const std::string& data) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream out(path, std::ios::binary);
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i, n >>= 8) out.put(static_cast<char>(n & 0xff));
  out << header << data;
  return path;
}

/// What reading every tensor of a safetensors file gives: its values, or the error's text; from the
/// file (open) or from its bytes in memory (from_bytes), which must agree.
std::string read_all(const std::string& path, bool in_memory) {
  try {
    const auto f = in_memory ? SafetensorsFile::from_bytes(map_file(path), path) : SafetensorsFile::open(path);
    std::string out = "ok";
    for (const auto& n : f.names())
      for (float v : f.read_f32(n)) out.append(" ").append(std::to_string(v));
    return out;
  } catch (const IoError& e) {
    return std::string("IoError: ") + e.what();
  }
}

void expect_io_error(const std::string& path, const char* substring) {
  try {
    SafetensorsFile::open(path);
    FAIL() << "accepted " << path;
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_all(path, true), read_all(path, false)) << "from_bytes and open differ on " << path;
}

TEST(Safetensors, RoundTripAndConversions) {
  const std::string path = ::testing::TempDir() + "/rt.safetensors";
  write_safetensors(path, {{"b", {2, 3}, {1, 2, 3, 4, 5, 6}}, {"a", {}, {7}}, {"z", {0, 4}, {}}}, {{"k", "v"}});
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.read_f32("b", {2, 3}), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(f.read_f32("a"), std::vector<float>{7});
  EXPECT_TRUE(f.read_f32("z").empty());
  EXPECT_EQ(f.metadata().at("k"), "v");
  EXPECT_THROW(f.read_f32("b", {3, 2}), IoError);
  EXPECT_THROW(f.entry("missing"), IoError);
  // BF16 1.5 = 0x3FC0, F16 -2.0 = 0xC000, F16 subnormal 2^-24 = 0x0001.
  const std::string raw = write_raw("conv.safetensors",
      R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"w":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]}})",
      std::string("\x00\xC0\x01\x00\xC0\x3F", 6));
  const auto g = SafetensorsFile::open(raw);
  EXPECT_EQ(g.read_f32("w"), std::vector<float>{1.5f});
  EXPECT_EQ(g.read_f32("h"), (std::vector<float>{-2.0f, 5.9604645e-8f}));
  // The same tensors from the bytes in memory (what a checkpoint load reads once and verifies).
  for (const std::string& p : {path, raw}) EXPECT_EQ(read_all(p, true), read_all(p, false)) << p;
  EXPECT_EQ(read_all(raw, true), "ok " + std::to_string(-2.0f) + " " + std::to_string(5.9604645e-8f) + " " +
                                     std::to_string(1.5f));
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string data(8, '\0');
  expect_io_error(write_raw("trunc.safetensors", ok, data.substr(0, 4)), "t");
  expect_io_error(write_raw("extra.safetensors", ok, data + "xxxx"), "data section");
  expect_io_error(write_raw("json.safetensors", "{not json", data), "not valid JSON");
  expect_io_error(write_raw("dtype.safetensors", R"({"t":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", data), "unknown dtype");
  expect_io_error(write_raw("size.safetensors", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data), "needs 12");
  expect_io_error(write_raw("oob.safetensors", R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data), "past the data section");
  expect_io_error(write_raw("neg.safetensors", R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data), "non-negative");
  expect_io_error(write_raw("gap.safetensors", R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data), "contiguous");
  expect_io_error(write_raw("overlap.safetensors",
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data), "contiguous");
  expect_io_error(write_raw("dup.safetensors",
      R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data), "twice");
  const std::string huge = ::testing::TempDir() + "/huge.safetensors";
  { std::ofstream out(huge, std::ios::binary); out << std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) << "{}"; }
  expect_io_error(huge, "exceeds the limit");
  const std::string tiny = ::testing::TempDir() + "/tiny.safetensors";
  { std::ofstream out(tiny, std::ios::binary); out << "abc"; }
  expect_io_error(tiny, "shorter than");
  EXPECT_THROW(SafetensorsFile::open(::testing::TempDir() + "/absent.safetensors"), IoError);
  // Nesting 100,000 deep (which would overflow the stack of anything recursing over it) is refused
  // before a DOM exists; so is a key given twice inside a tensor's entry.
  const std::string deep = R"({"t":{"dtype":"F32","shape":)" + std::string(100000, '[') + std::string(100000, ']') +
                           R"(,"data_offsets":[0,8]}})";
  expect_io_error(write_raw("deep.safetensors", deep, data), "nested deeper than 64");
  expect_io_error(write_raw("dupinner.safetensors",
      R"({"t":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", data), "'dtype' appears twice");
}

// Many tensors open in time linear in the header (the callback parser used before was quadratic:
// 40,000 tensors took over a minute); here 40,000 must open and list.
TEST(Safetensors, ManyTensorsOpen) {
  std::string header = "{";
  const int n = 40000;
  for (int i = 0; i < n; ++i) {
    if (i) header.append(",");
    header.append("\"t").append(std::to_string(i)).append("\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[");
    header.append(std::to_string(4 * i)).append(",").append(std::to_string(4 * i + 4)).append("]}");
  }
  header += "}";
  const auto f = SafetensorsFile::open(write_raw("many.safetensors", header, std::string(4 * n, '\0')));
  EXPECT_EQ(f.names().size(), static_cast<std::size_t>(n));
}

TEST(Config, NearMissKeysAreNamed) {
  json j = base_config();
  j["num_experts_per_to"] = 4;
  j["num_attention_heads"] = 128;  // a real Hugging Face key moex does not read: no warning
  j["first_k_dense_replace"] = 3;
  j["kv_lora_rank"] = 512;
  const auto w = MoeConfig::near_misses(j);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("'num_experts_per_to'"), std::string::npos) << w[0];
  EXPECT_NE(w[0].find("'num_experts_per_tok'"), std::string::npos) << w[0];
  EXPECT_TRUE(MoeConfig::near_misses(base_config()).empty());
}

TEST(Config, DeepNestingFoldersAndDuplicatesAreConfigErrors) {
  const std::string dir = ::testing::TempDir();
  auto expect_config_error = [&](const std::string& path, const char* what) {
    try {
      MoeConfig::from_file(path);
      ADD_FAILURE() << "accepted " << path;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  { std::ofstream(dir + "/deep.json") << R"({"hidden_size":)" << std::string(100000, '[') << std::string(100000, ']') << "}"; }
  expect_config_error(dir + "/deep.json", "nested deeper than 64");
  { std::ofstream(dir + "/dup.json") << R"({"hidden_size":16,"hidden_size":32})"; }
  expect_config_error(dir + "/dup.json", "'hidden_size' appears twice");
  expect_config_error(dir, "is a folder");
}

TEST(Safetensors, FuzzedFilesOnlyEverThrowIoError) {
  const std::string good = ::testing::TempDir() + "/fuzz-src.safetensors";
  write_safetensors(good, {{"x", {3, 2}, {1, 2, 3, 4, 5, 6}}, {"y", {2}, {7, 8}}});
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Rng rng(3);
  const std::string path = ::testing::TempDir() + "/fuzz.safetensors";
  int rejected = 0;
  for (int i = 0; i < 1500; ++i) {
    std::string b = bytes;
    if (i % 3 == 0) {
      b.resize(rng.next() % b.size());
    } else {
      for (int m = 0; m < 1 + static_cast<int>(rng.next() % 4); ++m) b[rng.next() % b.size()] = static_cast<char>(rng.next());
    }
    { std::ofstream out(path, std::ios::binary | std::ios::trunc); out << b; }
    EXPECT_EQ(read_all(path, true), read_all(path, false)) << "mutation " << i;
    try {
      const auto f = SafetensorsFile::open(path);
      for (const auto& n : f.names()) (void)f.read_f32(n);
    } catch (const IoError&) {
      ++rejected;
    }  // anything else escapes and fails the test
  }
  EXPECT_GT(rejected, 500);
}

// The checksum is the same however the bytes are cut into pieces, the same as a file's, and sees
// every byte (a flipped bit, a trailing zero byte).
TEST(Checksum, PiecesFileAndEveryByte) {
  std::string bytes;
  Rng rng(5);
  for (int i = 0; i < 1000; ++i) bytes.push_back(static_cast<char>(rng.next() & 0xff));
  Checksum whole;
  whole.update(bytes.data(), bytes.size());
  for (std::size_t cut : {1u, 3u, 7u, 8u, 13u, 999u}) {
    Checksum parts;
    for (std::size_t at = 0; at < bytes.size(); at += cut) parts.update(bytes.data() + at, std::min(cut, bytes.size() - at));
    EXPECT_EQ(parts.hex(), whole.hex()) << "pieces of " << cut;
  }
  const std::string path = ::testing::TempDir() + "/sum.bin";
  { std::ofstream(path, std::ios::binary) << bytes; }
  EXPECT_EQ(file_checksum(path), whole.hex());
  std::string flipped = bytes;
  flipped[500] ^= 1;
  Checksum f, z;
  f.update(flipped.data(), flipped.size());
  EXPECT_NE(f.hex(), whole.hex());
  const std::string longer = bytes + std::string(1, '\0');
  z.update(longer.data(), longer.size());
  EXPECT_NE(z.hex(), whole.hex());
}

// F8_E4M3 ("fn"): every code against the format's definition in float64, independently written.
TEST(Fp8, EveryCodeDecodesAsTheFormatDefines) {
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float got = fp8_e4m3_to_float(static_cast<std::uint8_t>(b));
    if (e == 15 && m == 7) {
      EXPECT_TRUE(std::isnan(got)) << b;
      continue;
    }
    double want = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
    if (b & 0x80) want = -want;
    EXPECT_EQ(static_cast<double>(got), want) << "code " << b;
  }
  EXPECT_EQ(fp8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));
}

// A sharded checkpoint: an FP8 weight [3, 5] with 2x2 block scales [2, 3] in another shard; the
// index's rules.
TEST(HfCheckpointFiles, ShardsFp8BlocksAndIndexRules) {
  namespace fs = std::filesystem;
  const std::string dir = ::testing::TempDir() + "/hf_ckpt";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::string codes;
  for (int i = 0; i < 15; ++i) codes.push_back(static_cast<char>(0x30 + i));  // 0.5, 0.5625, ...
  auto raw_file = [&](const std::string& name, const std::string& header, const std::string& data) {
    const std::string p = dir + "/" + name;
    std::ofstream out(p, std::ios::binary);
    std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i, n >>= 8) out.put(static_cast<char>(n & 0xff));
    out << header << data;
  };
  raw_file("a.safetensors", R"({"model.layers.2.mlp.experts.0.up_proj.weight":{"dtype":"F8_E4M3","shape":[3,5],"data_offsets":[0,15]}})",
           codes);
  const std::vector<float> scales{1, 2, 4, 8, 16, 32};
  write_safetensors(dir + "/b.safetensors", {{"model.layers.2.mlp.experts.0.up_proj.weight_scale_inv", {2, 3}, scales},
                                             {"model.layers.2.mlp.gate.weight", {1, 2}, {1, 2}},
                                             {"model.layers.10.mlp.gate.weight", {1, 2}, {3, 4}}});
  auto index = [&](const std::string& text) {
    std::ofstream(dir + "/model.safetensors.index.json") << text;
  };
  index(R"({"weight_map":{"model.layers.2.mlp.experts.0.up_proj.weight":"a.safetensors",
    "model.layers.2.mlp.experts.0.up_proj.weight_scale_inv":"b.safetensors",
    "model.layers.2.mlp.gate.weight":"b.safetensors","model.layers.10.mlp.gate.weight":"b.safetensors"}})");
  const HfCheckpoint c = HfCheckpoint::open(dir);
  EXPECT_EQ(c.moe_prefixes(), (std::vector<std::string>{"model.layers.2.mlp.", "model.layers.10.mlp."}));
  const auto w = c.read_weight("model.layers.2.mlp.experts.0.up_proj.weight", {3, 5}, 2, 2);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 5; ++j) {
      const double want = static_cast<double>(fp8_e4m3_to_float(static_cast<std::uint8_t>(0x30 + 5 * i + j))) *
                          scales[static_cast<std::size_t>((i / 2) * 3 + j / 2)];
      EXPECT_EQ(static_cast<double>(w[static_cast<std::size_t>(5 * i + j)]), want) << i << "," << j;
    }
  // Block sizes that do not fit the scale's shape are named.
  EXPECT_THROW(c.read_weight("model.layers.2.mlp.experts.0.up_proj.weight", {3, 5}, 128, 128), IoError);
  auto refused = [&](const std::string& text, const char* what) {
    index(text);
    try {
      HfCheckpoint::open(dir);
      ADD_FAILURE() << "accepted an index with " << what;
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused(R"({"weight_map":{"x":"../b.safetensors"}})", "no path");
  refused(R"({"weight_map":{"x":"c.safetensors"}})", "missing");
  refused(R"({"weight_map":{"x":"b.safetensors"}})", "does not hold it");
  refused(R"({"weight_map":{"x":3}})", "not a file name");
  refused(R"([1,2])", "weight_map");
  refused(R"({"weight_map":)", "not valid JSON");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moex

namespace moex {
namespace {
// Found by scripts/mutate.py: a FIFO given as a config or tensor file blocked its reader forever. A
// FIFO, a device or a folder is refused by name before anything opens it.
TEST(Files, OnlyRegularFilesAreRead) {
  const std::string fifo = ::testing::TempDir() + "/moex-test-fifo";
  std::filesystem::remove(fifo);
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto refused = [](const std::function<void()>& read, const std::string& path, const std::string& kind) {
    try {
      read();
      ADD_FAILURE() << path << " was read";
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(kind), std::string::npos) << e.what();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  };
  for (const std::string& path : {fifo, std::string("/dev/null")}) {
    const std::string kind = path == fifo ? "a FIFO" : "a device";
    refused([&] { MoeConfig::from_file(path); }, path, kind);
    refused([&] { SafetensorsFile::open(path); }, path, kind);
    refused([&] { map_file(path); }, path, kind);
    refused([&] { read_file(path); }, path, kind);
    refused([&] { HfCheckpoint::open(path); }, path, "");
  }
  refused([&] { map_file(::testing::TempDir()); }, ::testing::TempDir(), "a folder");
  // An atomic write renames a temporary over its path: it must not replace a FIFO or /dev/null (found
  // by the sweep: `--output /dev/null` as root made /dev/null a regular file).
  for (const std::string& path : {fifo, std::string("/dev/null")}) {
    refused([&] { write_file_atomic(path, "x"); }, path, path == fifo ? "a FIFO" : "a device");
    refused([&] { write_safetensors(path, std::vector<NamedTensor>{}); }, path, path == fifo ? "a FIFO" : "a device");
  }
  struct stat st {};
  ASSERT_EQ(::stat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  ASSERT_EQ(::stat("/dev/null", &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  std::filesystem::remove(fifo);
}

}  // namespace
}  // namespace moex
