// The state of every Buffer on every device, for every mode: one registry per library, keyed by
// (Buffer id, device ordinal). Python creates and destroys states through the bindings; an FFI
// handler finds its state from its `buffer_id` attribute and the device it runs on.
//
// States are handed out as shared_ptr: a Buffer destroyed while a handler is launching one of its
// ops frees its memory only once that handler lets go. The mutex guards the map only; nobody
// holds it across a CUDA call that may block.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace jax_deepep {

template <typename State>
class Registry {
 public:
  using Key = std::pair<int64_t, int>;  // (Buffer id, device ordinal)

  // False when the key is taken.
  bool add(Key key, std::shared_ptr<State> state) {
    std::lock_guard<std::mutex> lock(mutex_);
    return states_.emplace(key, std::move(state)).second;
  }

  std::shared_ptr<State> find(Key key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = states_.find(key);
    return it == states_.end() ? nullptr : it->second;
  }

  // Takes the state out (null when absent); the caller winds it down outside the lock.
  std::shared_ptr<State> remove(Key key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = states_.find(key);
    if (it == states_.end()) return nullptr;
    std::shared_ptr<State> state = std::move(it->second);
    states_.erase(it);
    return state;
  }

  std::vector<std::pair<Key, std::shared_ptr<State>>> all() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return {states_.begin(), states_.end()};
  }

 private:
  mutable std::mutex mutex_;
  std::map<Key, std::shared_ptr<State>> states_;
};

}  // namespace jax_deepep
