# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""Python's enums come from the op library (csrc/hashtable/constants.h and the enums it names): every
code Python uses is a C++ one, and every C++ code has its Python name."""

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from recis_torchrec.tables.hash_table import ROW_TYPES
from recis_torchrec.tables.options import EVICTION_POLICIES, INITIALIZERS, HashTableOptions
from recis_torchrec.ops import constants
from recis_torchrec.optim.fused import STATE_SLOTS, parse_fused_params


def test_every_cpp_code_has_its_python_use():
    assert set(INITIALIZERS) == set(constants.INIT_KINDS)
    for name, code in constants.INIT_KINDS.items():
        assert HashTableOptions(initializer=name).init_kind() == code
    assert set(EVICTION_POLICIES) == set(constants.EVICTION_POLICIES)
    assert HashTableOptions(max_capacity=8, eviction_policy="lfu").policy_code() == constants.EVICTION_POLICIES["lfu"]
    assert set(STATE_SLOTS) == set(constants.OPTIMIZERS.values())
    fused = {
        EmbOptimType.EXACT_SGD: "sgd", EmbOptimType.EXACT_ADAGRAD: "adagrad",
        EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad", EmbOptimType.ADAM: "adam",
    }
    for optim, name in fused.items():
        assert parse_fused_params({"optimizer": optim}).code == constants.OPTIMIZERS[name]
    assert {str(d).replace("torch.", ""): c for d, c in ROW_TYPES.items()} == constants.ROW_TYPES
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in constants.ROW_TYPES)
    assert (constants.POOLING_SUM, constants.POOLING_MEAN) == (0, 1)
    assert constants.ROW_META_COLUMNS == 3
