// TEST DOUBLE of Triton's `tensorrt_llm` model as a native (C++) Triton backend -- for overhead and load
// measurement only, never a model. Built by build_engine/fast_double.py into the rendered model's version
// directory as libtriton_fastdouble.so (config: backend "fastdouble").
//
// Why a native one next to the Python double (1/model.py): TensorRT-LLM's backend is native and runs inside
// tritonserver, so a Python double adds a cost the real deployment does not have -- every response crosses
// the Python backend's shared-memory IPC to the stub process and back. With this one, tritonserver's CPU per
// token is what a GPU deployment pays around its engine (response objects, the gRPC send); the double's own
// work per token is a heap pop and a few small copies.
//
// Contract (a streaming subset of the Python double's): `input_ids` (its length is num_input_tokens),
// `request_output_len`, `streaming` (must be true); responses carry one token each, drawn from the
// `token_cycle` parameter, with `output_ids` [1, 1, 1], `sequence_length`, `num_input_tokens`,
// `num_output_tokens` -- only those the request asks for -- and the last token travels with the final flag.
// With `return_log_probs`, `output_log_probs` [1, 1, 1] and the top-k extension [1, 1, k] come along, with the
// Python double's made-up values (every token -0.5; its top k: the token and the next cycle ids, at -0.5 - j).
// Pacing is an absolute schedule per request as in the Python double; cancellation is polled every 50 ms.
//
// The Triton C API is declared here from its documentation (tritonbackend.h / tritonserver.h, API 1.x);
// only what this file calls.

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern "C" {
struct TRITONSERVER_Error;
struct TRITONSERVER_Message;
struct TRITONBACKEND_Model;
struct TRITONBACKEND_ModelInstance;
struct TRITONBACKEND_Request;
struct TRITONBACKEND_Input;
struct TRITONBACKEND_Response;
struct TRITONBACKEND_ResponseFactory;
struct TRITONBACKEND_Output;

enum TRITONSERVER_Error_Code { TRITONSERVER_ERROR_INTERNAL = 1, TRITONSERVER_ERROR_INVALID_ARG = 3 };
enum TRITONSERVER_DataType { TRITONSERVER_TYPE_INT32 = 8, TRITONSERVER_TYPE_FP32 = 11 };
enum TRITONSERVER_MemoryType {
  TRITONSERVER_MEMORY_CPU = 0,
  TRITONSERVER_MEMORY_CPU_PINNED = 1,
  TRITONSERVER_MEMORY_GPU = 2
};
const uint32_t RESPONSE_COMPLETE_FINAL = 1;  // TRITONSERVER_RESPONSE_COMPLETE_FINAL
const uint32_t REQUEST_RELEASE_ALL = 1;      // TRITONSERVER_REQUEST_RELEASE_ALL

TRITONSERVER_Error* TRITONSERVER_ErrorNew(TRITONSERVER_Error_Code code, const char* msg);
void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
const char* TRITONSERVER_ErrorMessage(TRITONSERVER_Error* error);
TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(
    TRITONSERVER_Message* message, const char** base, size_t* byte_size);
TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);

TRITONSERVER_Error* TRITONBACKEND_ModelConfig(
    TRITONBACKEND_Model* model, const uint32_t config_version, TRITONSERVER_Message** model_config);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Model** model);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceSetState(TRITONBACKEND_ModelInstance* instance, void* state);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceState(TRITONBACKEND_ModelInstance* instance, void** state);
TRITONSERVER_Error* TRITONBACKEND_RequestInput(
    TRITONBACKEND_Request* request, const char* name, TRITONBACKEND_Input** input);
TRITONSERVER_Error* TRITONBACKEND_InputProperties(
    TRITONBACKEND_Input* input, const char** name, TRITONSERVER_DataType* datatype, const int64_t** shape,
    uint32_t* dims_count, uint64_t* byte_size, uint32_t* buffer_count);
TRITONSERVER_Error* TRITONBACKEND_InputBuffer(
    TRITONBACKEND_Input* input, const uint32_t index, const void** buffer, uint64_t* buffer_byte_size,
    TRITONSERVER_MemoryType* memory_type, int64_t* memory_type_id);
TRITONSERVER_Error* TRITONBACKEND_RequestOutputCount(TRITONBACKEND_Request* request, uint32_t* count);
TRITONSERVER_Error* TRITONBACKEND_RequestOutputName(
    TRITONBACKEND_Request* request, const uint32_t index, const char** output_name);
TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* request, uint32_t release_flags);
TRITONSERVER_Error* TRITONBACKEND_ResponseFactoryNew(
    TRITONBACKEND_ResponseFactory** factory, TRITONBACKEND_Request* request);
TRITONSERVER_Error* TRITONBACKEND_ResponseFactoryDelete(TRITONBACKEND_ResponseFactory* factory);
TRITONSERVER_Error* TRITONBACKEND_ResponseFactorySendFlags(
    TRITONBACKEND_ResponseFactory* factory, const uint32_t send_flags);
TRITONSERVER_Error* TRITONBACKEND_ResponseFactoryIsCancelled(
    TRITONBACKEND_ResponseFactory* factory, bool* is_cancelled);
TRITONSERVER_Error* TRITONBACKEND_ResponseNewFromFactory(
    TRITONBACKEND_Response** response, TRITONBACKEND_ResponseFactory* factory);
TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(
    TRITONBACKEND_Response* response, TRITONBACKEND_Output** output, const char* name,
    const TRITONSERVER_DataType datatype, const int64_t* shape, const uint32_t dims_count);
TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(
    TRITONBACKEND_Output* output, void** buffer, const uint64_t buffer_byte_size,
    TRITONSERVER_MemoryType* memory_type, int64_t* memory_type_id);
TRITONSERVER_Error* TRITONBACKEND_ResponseSend(
    TRITONBACKEND_Response* response, const uint32_t send_flags, TRITONSERVER_Error* error);
TRITONSERVER_Error* TRITONBACKEND_ResponseDelete(TRITONBACKEND_Response* response);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, const bool success,
    const uint64_t exec_start_ns, const uint64_t compute_start_ns, const uint64_t compute_end_ns,
    const uint64_t exec_end_ns);
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(
    TRITONBACKEND_ModelInstance* instance, const uint64_t batch_size, const uint64_t exec_start_ns,
    const uint64_t compute_start_ns, const uint64_t compute_end_ns, const uint64_t exec_end_ns);
}

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kCancelPoll = std::chrono::milliseconds(50);

// Logs and frees a Triton error; true if there was one.
bool Failed(TRITONSERVER_Error* err, const char* what) {
  if (err == nullptr) return false;
  std::fprintf(stderr, "fast double: %s: %s\n", what, TRITONSERVER_ErrorMessage(err));
  TRITONSERVER_ErrorDelete(err);
  return true;
}

// Frees an expected error (an optional input that is absent); true if there was one.
bool Absent(TRITONSERVER_Error* err) {
  if (err == nullptr) return false;
  TRITONSERVER_ErrorDelete(err);
  return true;
}

// `"key":{"string_value":"..."}` from the model config JSON (the only shape Triton gives parameters).
std::string Parameter(const std::string& json, const std::string& key, const std::string& fallback) {
  const std::string head = "\"" + key + "\":{\"string_value\":\"";
  const size_t at = json.find(head);
  if (at == std::string::npos) return fallback;
  const size_t start = at + head.size();
  return json.substr(start, json.find('"', start) - start);
}

// Output names in the order they are written; `want` bit i = the request asked for kOutputs[i]. The last
// three are sent only with return_log_probs.
constexpr const char* kOutputs[] = {
    "output_ids",       "sequence_length",      "num_input_tokens", "num_output_tokens",
    "output_log_probs", "ext_top_log_prob_ids", "ext_top_log_probs"};
constexpr unsigned kOutputCount = sizeof(kOutputs) / sizeof(kOutputs[0]);
constexpr unsigned kLogProbOutputs = 0x70;  // bits 4-6
constexpr float kLogProb = -0.5f;

struct Stream {
  TRITONBACKEND_ResponseFactory* factory;
  int32_t num_input;
  int32_t max_new;
  int32_t emitted = 0;
  unsigned want = 0;
  bool log_probs = false;  // return_log_probs
  Clock::time_point first_due;
  Clock::time_point next_poll;
};

struct Due {
  Clock::time_point when;
  uint64_t seq;
  Stream* stream;
  bool operator>(const Due& o) const { return when != o.when ? when > o.when : seq > o.seq; }
};

class Pacer {
 public:
  Pacer(
      std::vector<int32_t> cycle, size_t top_k, Clock::duration interval, Clock::duration first_delay,
      size_t max_active)
      : cycle_(std::move(cycle)), top_k_(top_k), interval_(interval), first_delay_(first_delay),
        max_active_(std::max<size_t>(1, max_active)), thread_([this] { Run(); }) {
    pthread_setname_np(thread_.native_handle(), "fast-double");
  }

  ~Pacer() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
    while (!heap_.empty()) {  // unload with requests in flight: end them
      End(heap_.top().stream);
      heap_.pop();
    }
    for (Stream* s : waiting_) End(s);
  }

  void Submit(Stream* s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      waiting_.push_back(s);
      Admit(Clock::now());
    }
    cv_.notify_one();
  }

 private:
  void Admit(Clock::time_point now) {  // with mu_ held
    while (!waiting_.empty() && active_ < max_active_) {
      Stream* s = waiting_.front();
      waiting_.pop_front();
      ++active_;
      s->first_due = now + first_delay_;
      s->next_poll = now + kCancelPoll;
      heap_.push({s->first_due, seq_++, s});
    }
  }

  static void End(Stream* s) {
    Failed(TRITONBACKEND_ResponseFactorySendFlags(s->factory, RESPONSE_COMPLETE_FINAL), "final flag");
    Failed(TRITONBACKEND_ResponseFactoryDelete(s->factory), "factory delete");
    delete s;
  }

  void Run() {
    std::vector<Stream*> due;
    for (;;) {
      Clock::time_point now;
      {
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
          if (stop_) return;
          now = Clock::now();
          if (!heap_.empty() && heap_.top().when <= now) break;
          if (heap_.empty()) {
            cv_.wait(lock);
          } else {
            cv_.wait_until(lock, heap_.top().when);
          }
        }
        while (!heap_.empty() && heap_.top().when <= now) {  // everything due now, in due order
          due.push_back(heap_.top().stream);
          heap_.pop();
        }
      }
      size_t finished = 0;
      for (Stream* s : due) {
        if (Step(s, now)) {
          ++finished;
          continue;
        }
        const Clock::time_point when = s->first_due + interval_ * s->emitted;  // absolute schedule
        std::lock_guard<std::mutex> lock(mu_);
        heap_.push({when, seq_++, s});
      }
      due.clear();
      if (finished > 0) {
        std::lock_guard<std::mutex> lock(mu_);
        active_ -= finished;
        Admit(Clock::now());
      }
    }
  }

  // Emits the stream's next token; true when the stream is finished (and freed).
  bool Step(Stream* s, Clock::time_point now) {
    if (now >= s->next_poll) {
      s->next_poll = now + kCancelPoll;
      bool cancelled = false;
      if (!Failed(TRITONBACKEND_ResponseFactoryIsCancelled(s->factory, &cancelled), "cancel poll") &&
          cancelled) {
        End(s);
        return true;
      }
    }
    const size_t position = s->emitted % cycle_.size();
    ++s->emitted;
    const bool last = s->emitted >= s->max_new;
    if (!Send(s, position, last)) {
      End(s);
      return true;
    }
    if (last) {
      Failed(TRITONBACKEND_ResponseFactoryDelete(s->factory), "factory delete");
      delete s;
    }
    return last;
  }

  // One output of `response` holding `bytes` bytes of `data`; false (response deleted) on failure.
  static bool Write(
      TRITONBACKEND_Response* response, const char* name, TRITONSERVER_DataType datatype, const int64_t* shape,
      uint32_t dims, const void* data, size_t bytes) {
    TRITONBACKEND_Output* output = nullptr;
    void* buffer = nullptr;
    TRITONSERVER_MemoryType memory_type = TRITONSERVER_MEMORY_CPU;
    int64_t memory_type_id = 0;
    if (Failed(TRITONBACKEND_ResponseOutput(response, &output, name, datatype, shape, dims), "response output") ||
        Failed(TRITONBACKEND_OutputBuffer(output, &buffer, bytes, &memory_type, &memory_type_id), "output buffer") ||
        memory_type == TRITONSERVER_MEMORY_GPU) {
      Failed(TRITONBACKEND_ResponseDelete(response), "response delete");
      return false;
    }
    std::memcpy(buffer, data, bytes);
    return true;
  }

  // Sends the token at cycle `position`; false when the response could not be made or sent.
  bool Send(Stream* s, size_t position, bool last) {
    TRITONBACKEND_Response* response = nullptr;
    if (Failed(TRITONBACKEND_ResponseNewFromFactory(&response, s->factory), "new response")) return false;
    const int32_t values[] = {cycle_[position], 1, s->num_input, 1};
    const int64_t ids_shape[] = {1, 1, 1};
    const int64_t scalar_shape[] = {1, 1};
    for (unsigned i = 0; i < 4; ++i) {
      if (!(s->want & (1u << i))) continue;
      if (!Write(
              response, kOutputs[i], TRITONSERVER_TYPE_INT32, i == 0 ? ids_shape : scalar_shape, i == 0 ? 3 : 2,
              &values[i], sizeof(int32_t))) {
        return false;
      }
    }
    if (s->log_probs && (s->want & kLogProbOutputs)) {
      const int64_t top_shape[] = {1, 1, static_cast<int64_t>(top_k_)};
      std::vector<int32_t> top_ids(top_k_);
      std::vector<float> top_values(top_k_);
      for (size_t j = 0; j < top_k_; ++j) {
        top_ids[j] = cycle_[(position + j) % cycle_.size()];
        top_values[j] = kLogProb - static_cast<float>(j);
      }
      if (((s->want & (1u << 4)) &&
           !Write(response, kOutputs[4], TRITONSERVER_TYPE_FP32, ids_shape, 3, &kLogProb, sizeof(float))) ||
          ((s->want & (1u << 5)) && !Write(
                                        response, kOutputs[5], TRITONSERVER_TYPE_INT32, top_shape, 3,
                                        top_ids.data(), top_k_ * sizeof(int32_t))) ||
          ((s->want & (1u << 6)) && !Write(
                                        response, kOutputs[6], TRITONSERVER_TYPE_FP32, top_shape, 3,
                                        top_values.data(), top_k_ * sizeof(float)))) {
        return false;
      }
    }
    return !Failed(
        TRITONBACKEND_ResponseSend(response, last ? RESPONSE_COMPLETE_FINAL : 0, nullptr), "response send");
  }

  const std::vector<int32_t> cycle_;
  const size_t top_k_;
  const Clock::duration interval_, first_delay_;
  const size_t max_active_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::priority_queue<Due, std::vector<Due>, std::greater<Due>> heap_;
  std::deque<Stream*> waiting_;
  size_t active_ = 0;
  uint64_t seq_ = 0;
  bool stop_ = false;
  std::thread thread_;  // last: starts once everything above exists
};

// One scalar of an input tensor (CPU memory: this double serves CPU-only servers).
template <typename T>
bool Scalar(TRITONBACKEND_Request* request, const char* name, T* value) {
  TRITONBACKEND_Input* input = nullptr;
  if (Absent(TRITONBACKEND_RequestInput(request, name, &input)) || input == nullptr) return false;
  const void* buffer = nullptr;
  uint64_t size = 0;
  TRITONSERVER_MemoryType memory_type = TRITONSERVER_MEMORY_CPU;  // in/out: preferred, then actual
  int64_t memory_type_id = 0;
  if (Failed(TRITONBACKEND_InputBuffer(input, 0, &buffer, &size, &memory_type, &memory_type_id), name) ||
      memory_type == TRITONSERVER_MEMORY_GPU || size < sizeof(T)) {
    return false;
  }
  std::memcpy(value, buffer, sizeof(T));
  return true;
}

// The request's stream, or an error message.
std::string Parse(TRITONBACKEND_Request* request, Stream* s) {
  TRITONBACKEND_Input* ids = nullptr;
  const char* name = nullptr;
  TRITONSERVER_DataType datatype;
  const int64_t* shape = nullptr;
  uint32_t dims = 0, buffers = 0;
  uint64_t ids_bytes = 0;
  if (Absent(TRITONBACKEND_RequestInput(request, "input_ids", &ids)) || ids == nullptr ||
      Failed(TRITONBACKEND_InputProperties(ids, &name, &datatype, &shape, &dims, &ids_bytes, &buffers),
             "input_ids") ||
      ids_bytes == 0) {
    return "input_ids is required";
  }
  s->num_input = static_cast<int32_t>(ids_bytes / sizeof(int32_t));
  if (!Scalar(request, "request_output_len", &s->max_new) || s->max_new <= 0) {
    return "request_output_len must be at least 1";
  }
  bool streaming = false;
  if (!Scalar(request, "streaming", &streaming) || !streaming) {
    return "the native fast double streams only (streaming=true)";
  }
  Scalar(request, "return_log_probs", &s->log_probs);  // optional: absent = false
  uint32_t count = 0;
  Failed(TRITONBACKEND_RequestOutputCount(request, &count), "output count");
  for (uint32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    if (Failed(TRITONBACKEND_RequestOutputName(request, i, &name), "output name")) continue;
    for (unsigned k = 0; k < kOutputCount; ++k) {
      if (std::strcmp(name, kOutputs[k]) == 0) s->want |= 1u << k;
    }
  }
  return "";
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(
    TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model = nullptr;
  TRITONSERVER_Message* message = nullptr;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
  if (err == nullptr) err = TRITONBACKEND_ModelConfig(model, 1, &message);
  if (err != nullptr) return err;
  const char* base = nullptr;
  size_t size = 0;
  err = TRITONSERVER_MessageSerializeToJson(message, &base, &size);
  const std::string json = err == nullptr ? std::string(base, size) : std::string();
  Failed(TRITONSERVER_MessageDelete(message), "message delete");
  if (err != nullptr) return err;

  std::vector<int32_t> cycle;
  Pacer* pacer = nullptr;
  try {  // a malformed number must fail the model load, not the server
    const std::string text = Parameter(json, "token_cycle", "");
    for (size_t pos = 0; pos < text.size();) {
      const size_t end = std::min(text.find(',', pos), text.size());
      cycle.push_back(std::stoi(text.substr(pos, end - pos)));
      pos = end + 1;
    }
    if (cycle.empty()) throw std::invalid_argument("token_cycle is empty");
    const auto us = [&](const char* key) {
      return std::chrono::microseconds(std::stoll(Parameter(json, key, "0")));
    };
    pacer = new Pacer(
        cycle, std::stoul(Parameter(json, "top_log_probs_k", "0")), us("token_interval_us"),
        us("first_token_delay_us"),
        std::stoul(Parameter(json, "max_active_requests", "8")));
  }
  catch (const std::exception& e) {
    const std::string message = std::string("fast double: bad parameters: ") + e.what();
    return TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, message.c_str());
  }
  std::fprintf(
      stderr, "tensorrt_llm NATIVE FAST TEST DOUBLE: token interval %s us (not a model; benchmarks only)\n",
      Parameter(json, "token_interval_us", "0").c_str());
  return TRITONBACKEND_ModelInstanceSetState(instance, pacer);
}

__attribute__((visibility("default"))) TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(
    TRITONBACKEND_ModelInstance* instance) {
  void* state = nullptr;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
  delete static_cast<Pacer*>(state);
  return err;
}

__attribute__((visibility("default"))) TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests, const uint32_t request_count) {
  void* state = nullptr;
  if (TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state)) return err;
  auto* pacer = static_cast<Pacer*>(state);
  // Triton's statistics (and the tools that read them, perf_analyzer included) need every backend to report
  // its executions; the generation itself is not timed here, as TensorRT-LLM's backend reports scheduling.
  const auto now_ns = [] {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
  };
  const uint64_t start_ns = now_ns();
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    auto* s = new Stream();
    if (Failed(TRITONBACKEND_ResponseFactoryNew(&s->factory, request), "response factory")) {
      delete s;
      Failed(TRITONBACKEND_RequestRelease(request, REQUEST_RELEASE_ALL), "request release");
      continue;
    }
    const std::string problem = Parse(request, s);
    const uint64_t end_ns = now_ns();
    Failed(
        TRITONBACKEND_ModelInstanceReportStatistics(
            instance, request, problem.empty(), start_ns, start_ns, end_ns, end_ns),
        "statistics");
    // Decoupled: the request is released now; its responses come from the pacer's thread.
    Failed(TRITONBACKEND_RequestRelease(request, REQUEST_RELEASE_ALL), "request release");
    if (problem.empty()) {
      pacer->Submit(s);
      continue;
    }
    TRITONBACKEND_Response* response = nullptr;
    const std::string message = "tensorrt_llm (native fast double): " + problem;
    if (!Failed(TRITONBACKEND_ResponseNewFromFactory(&response, s->factory), "error response")) {
      TRITONSERVER_Error* refusal = TRITONSERVER_ErrorNew(TRITONSERVER_ERROR_INVALID_ARG, message.c_str());
      Failed(TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, refusal), "error send");
      TRITONSERVER_ErrorDelete(refusal);  // ResponseSend leaves the error with the caller
    }
    Failed(TRITONBACKEND_ResponseFactoryDelete(s->factory), "factory delete");
    delete s;
  }
  const uint64_t end_ns = now_ns();
  Failed(
      TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, request_count, start_ns, start_ns, end_ns, end_ns),
      "batch statistics");
  return nullptr;
}

}  // extern "C"
