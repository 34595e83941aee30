// Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
//
// The ops' optimizer arguments -> the typed OptimParams every update kernel takes,
// checked once for the CPU and the CUDA ops alike (each message names the op).
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "../hashtable/optimizers.h"

namespace recis {

inline hashtable::OptimParams make_optim_params(const char* op, int64_t optimizer, c10::ArrayRef<double> hyperparameters,
                                                int64_t weight_decay_mode, int64_t step) {
  using hashtable::OptimType;
  TORCH_CHECK(hashtable::is_optimizer_code(optimizer), op, ": unknown optimizer code ", optimizer,
              " (the codes are recis_torchrec.ops.constants.OPTIMIZERS)");
  TORCH_CHECK(static_cast<int64_t>(hyperparameters.size()) == hashtable::kNumHyperparameters, op, ": ",
              hyperparameters.size(), " hyperparameters given, the update reads ", hashtable::kNumHyperparameters,
              " (recis_torchrec.ops.constants.HYPERPARAMETERS, in that order)");
  TORCH_CHECK(weight_decay_mode >= 0 && weight_decay_mode <= 2, op, ": unknown weight_decay_mode ",
              weight_decay_mode, " (0 = none, 1 = L2, 2 = decoupled)");
  hashtable::OptimParams p;
  p.type = static_cast<OptimType>(optimizer);
  size_t i = 0;
#define RECIS_HYPERPARAMETER_SET(field, str) p.field = static_cast<float>(hyperparameters[i++]);
  RECIS_HYPERPARAMETERS(RECIS_HYPERPARAMETER_SET)
#undef RECIS_HYPERPARAMETER_SET
  p.wd_mode = static_cast<hashtable::WeightDecayMode>(weight_decay_mode);
  p.step = step;
  bool bias_corrected = false;  // as the optimizer's update declares it (optimizers.h)
  hashtable::dispatch_optimizer(p.type, [&](auto opt) { bias_corrected = decltype(opt)::kBiasCorrection; });
  TORCH_CHECK(!bias_corrected || step >= 1, op, ": bias correction needs step >= 1, got ", step);
  p.prepare();
  return p;
}

}  // namespace recis
