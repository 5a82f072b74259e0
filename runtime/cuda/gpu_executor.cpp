#include "runtime/cuda/gpu_executor.h"

#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/moe_layer.h"

namespace moex::cuda {

GpuLayerExecutor::GpuLayerExecutor(comm::Communicator& host_comm, comm::Communicator& device_comm,
                                   GpuLayerOptions options)
    : host_comm_(host_comm), device_comm_(device_comm), options_(options) {}

GpuLayerExecutor::~GpuLayerExecutor() {
  // The twins' buffers may still be read by queued work.
  if (stream_) static_cast<void>(cudaStreamSynchronize(stream_->get()));
}

void GpuLayerExecutor::check(const MoELayer& layer) {
  const std::string what = "GPU layer for '" + layer.name() + "': ";
  if (layer.replica_layout()) return;  // every rank has the layout's slots
  const sched::ExpertPlacement& p = layer.placement();
  for (int r = 0; r < p.world_size(); ++r)
    if (p.num_local(r) == 0)
      throw ConfigError(what + "rank " + std::to_string(r) + " holds no routed expert (" +
                        std::to_string(p.num_experts()) + " experts over " + std::to_string(p.world_size()) +
                        " ranks); the GPU layer needs at least one per rank");
}

cudaStream_t GpuLayerExecutor::stream() {
  if (!stream_) stream_.emplace();
  return stream_->get();
}

GpuLayerExecutor::Twin& GpuLayerExecutor::twin(MoELayer& layer) {
  Twin& t = twins_[&layer];
  // A replica layout the host layer migrated to needs a GPU layer with the new slots.
  const std::optional<sched::ReplicaLayout>& layout = layer.replica_layout();
  std::optional<sched::ScheduleChoice> old_choice;  // --chunks auto: a decision of the old layer's trials is kept
  if (t.gpu && layout != t.layout) {
    synchronize(stream(), "before rebuilding a migrated layer", device_comm_.default_timeout());  // queued work may still use the old layer
    if (const sched::ScheduleChoice* c = t.gpu->schedule_choice()) old_choice = *c;
    t.gpu.reset();
  }
  if (!t.gpu) {
    check(layer);
    t.gpu = make_gpu_layer_like(layer, host_comm_, device_comm_, options_);
    if (old_choice) t.gpu->keep_schedule(*old_choice);
    t.layout = layout;
    t.dirty = true;
  }
  return t;
}

GpuMoELayer* GpuLayerExecutor::gpu_layer(const MoELayer& layer) {
  const auto it = twins_.find(&layer);
  return it == twins_.end() ? nullptr : it->second.gpu.get();
}

void GpuLayerExecutor::parameters_changed(MoELayer& layer) { twins_[&layer].dirty = true; }

void GpuLayerExecutor::forward(MoELayer& layer, const float* x, std::int64_t tokens, float* y) {
  Twin& t = twin(layer);
  const cudaStream_t s = stream();
  if (t.dirty) {
    synchronize(s, "before loading parameters", device_comm_.default_timeout());  // queued work may read them
    t.gpu->load_from(layer);
    t.dirty = false;
  }
  const std::int64_t H = layer.config().hidden_size;
  if (tokens > t.capacity) {
    synchronize(s, "before growing the activation buffers", device_comm_.default_timeout());
    t.x = DeviceBuffer<float>(static_cast<std::size_t>(tokens * H), s);
    t.y = DeviceBuffer<float>(static_cast<std::size_t>(tokens * H), s);
    t.dy = DeviceBuffer<float>(static_cast<std::size_t>(tokens * H), s);
    t.capacity = tokens;
  }
  const auto n = static_cast<std::size_t>(tokens * H);
  copy_to_device(t.x.data(), x, n, s);
  t.gpu->forward(t.x.data(), tokens, t.y.data(), s);
  copy_to_host(y, t.y.data(), n, s);

  // The pass's statistics, as the host layer would have recorded them.
  LayerRouteStats st;
  st.expert_tokens.assign(static_cast<std::size_t>(layer.config().n_routed_experts), 0);
  for (const std::int32_t e : t.gpu->topk_ids_host(s)) ++st.expert_tokens[static_cast<std::size_t>(e)];
  t.gpu->pass_plan()->count(st, H * static_cast<std::int64_t>(dtype_size(t.gpu->dtype())));
  layer.set_route_stats(st);
  layer.set_aux_loss_value(t.gpu->aux_loss_value(s));
}

void GpuLayerExecutor::backward(MoELayer& layer, const float* dy, float* dx) {
  Twin& t = twin(layer);
  const cudaStream_t s = stream();
  const std::int64_t tokens = t.gpu->tokens(), H = layer.config().hidden_size;
  const auto n = static_cast<std::size_t>(tokens * H);
  copy_to_device(t.dy.data(), dy, n, s);
  t.gpu->zero_grad(s);
  t.gpu->backward(t.dy.data(), t.y.data(), s);  // y's buffer takes dx
  copy_to_host(dx, t.y.data(), n, s);
  auto add = [](std::vector<float>& into, const std::vector<float>& from, const char* what) {
    if (into.size() != from.size())
      throw InternalError(std::string("GpuLayerExecutor: ") + what + " gradient sizes differ (host " +
                          std::to_string(into.size()) + ", GPU " + std::to_string(from.size()) + ")");
    for (std::size_t i = 0; i < into.size(); ++i) into[i] += from[i];
  };
  add(layer.replicated().grad, t.gpu->replicated_grads_host(s), "replicated");
  add(layer.experts().grad, t.gpu->expert_grads_host(s), "expert");
}

}  // namespace moex::cuda
