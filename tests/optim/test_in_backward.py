# Copyright (c) recis_torchrec authors. Licensed under the Apache License, Version 2.0.
"""``apply_optimizer_in_backward`` on a TorchRec EBC/EC is honoured by ``rt.convert``: it selects the
fused optimizer and hyperparameters that the matching ``fused_params`` select, or raises."""

import warnings

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.optim import optimizers as trec_optim
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import recis_torchrec as rt
from recis_torchrec.optim.fused import WeightDecayMode
from recis_torchrec.testing import random_kjt

KEYS = ["f0", "f1", "f2"]


def ebc() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    return EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=30, feature_names=["f0", "f1"]),
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=30, feature_names=["f2"]),
        ]
    )


def apply(module, cls, kwargs, params=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        apply_optimizer_in_backward(cls, module.parameters() if params is None else params, kwargs)
    return module


def train(module, steps=4):
    outs = []
    for s in range(steps):
        out = module(random_kjt(KEYS, 5, 4, num_ids=30, seed=s)).values()
        ((out - 0.3) ** 2).sum().backward()
        outs.append(out.detach())
    return torch.stack(outs)


def rows(module, name):
    ids, weights, state = module.tables()[name].export()
    order = torch.argsort(ids)
    return weights[order], state[order]


CASES = [
    (RowWiseAdagrad, {"lr": 0.1}, {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}),
    (trec_optim.Adagrad, {"lr": 0.2, "eps": 1e-6},
     {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.2, "eps": 1e-6}),
    (torch.optim.Adagrad, {"lr": 0.2, "eps": 1e-10, "foreach": False},
     {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.2, "eps": 1e-10}),
    (torch.optim.SGD, {"lr": 0.3, "weight_decay": 0.1},
     {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.3, "weight_decay": 0.1,
      "weight_decay_mode": WeightDecayMode.L2}),
    (trec_optim.SGD, {"lr": 0.3}, {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.3}),
    (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
     {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6}),
    (trec_optim.Adam, {"lr": 0.05, "weight_decay": 0.1, "weight_decay_mode": WeightDecayMode.DECOUPLE},
     {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "weight_decay": 0.1,
      "weight_decay_mode": WeightDecayMode.DECOUPLE}),
    (torch.optim.AdamW, {"lr": 0.05},
     {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.05, "weight_decay": 0.01,
      "weight_decay_mode": WeightDecayMode.DECOUPLE}),
    # TorchRec's LAMB placeholder: LAMB applies weight_decay itself (no mode).
    (trec_optim.LAMB, {"lr": 0.05, "eps": 1e-6, "beta1": 0.8, "weight_decay": 0.1},
     {"optimizer": EmbOptimType.LAMB, "learning_rate": 0.05, "eps": 1e-6, "beta1": 0.8, "weight_decay": 0.1}),
    # TorchRec's LarsSGD placeholder: its momentum is LARS's (plain SGD's has no fused form).
    (trec_optim.LarsSGD, {"lr": 0.5, "eta": 0.05, "momentum": 0.8, "weight_decay": 0.05},
     {"optimizer": EmbOptimType.LARS_SGD, "learning_rate": 0.5, "eta": 0.05, "momentum": 0.8, "weight_decay": 0.05}),
    # TorchRec's partial row-wise placeholders: FBGEMM's formulas, weight_decay applied by the update itself.
    (trec_optim.PartialRowWiseAdam, {"lr": 0.05, "eps": 1e-6, "beta2": 0.99, "weight_decay": 0.1},
     {"optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM, "learning_rate": 0.05, "eps": 1e-6, "beta2": 0.99,
      "weight_decay": 0.1}),
    (trec_optim.PartialRowWiseLAMB, {"lr": 0.05, "eps": 1e-6, "beta1": 0.8},
     {"optimizer": EmbOptimType.PARTIAL_ROWWISE_LAMB, "learning_rate": 0.05, "eps": 1e-6, "beta1": 0.8}),
]


@pytest.mark.parametrize("cls,kwargs,fused", CASES, ids=[f"{c[0].__module__}.{c[0].__name__}" for c in CASES])
def test_in_backward_optimizer_trains_as_the_matching_fused_params(cls, kwargs, fused):
    tagged = rt.convert(apply(ebc(), cls, kwargs))
    plain = rt.convert(ebc(), fused_params=fused)
    assert tagged.fused_optimizer.config == plain.fused_optimizer.config
    torch.testing.assert_close(train(tagged), train(plain), atol=0, rtol=0)
    for name in ("t0", "t1"):
        for a, b in zip(rows(tagged, name), rows(plain, name)):
            assert torch.equal(a, b), name
    # The default (EXACT_SGD at lr 0.01) would train differently: the case is not vacuous.
    default = rt.convert(ebc())
    assert not torch.equal(train(default), train(rt.convert(apply(ebc(), cls, kwargs))))


def test_per_table_optimizers_each_take_effect():
    model = ebc()
    apply(model, RowWiseAdagrad, {"lr": 0.1}, [model.embedding_bags["t0"].weight])
    apply(model, torch.optim.Adam, {"lr": 0.02}, [model.embedding_bags["t1"].weight])
    mixed = rt.convert(model)
    assert mixed.fused_optimizer.config_of("t0").optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    assert mixed.fused_optimizer.config_of("t1").optimizer == EmbOptimType.ADAM
    assert len(mixed.fused_optimizer.param_groups) == 2
    out = train(mixed)
    # Each table trains as a module holding that table alone with that optimizer does.
    alone0 = rt.convert(ebc(), fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1})
    alone1 = rt.convert(ebc(), fused_params={"optimizer": EmbOptimType.ADAM, "learning_rate": 0.02})
    out0, out1 = train(alone0), train(alone1)
    torch.testing.assert_close(out[..., :16], out0[..., :16], atol=0, rtol=0)
    torch.testing.assert_close(out[..., 16:], out1[..., 16:], atol=0, rtol=0)
    assert torch.equal(rows(mixed, "t0")[0], rows(alone0, "t0")[0])
    assert torch.equal(rows(mixed, "t1")[0], rows(alone1, "t1")[0])
    # The learning rate of one group reaches only its tables.
    mixed.fused_optimizer.param_groups[1]["lr"] = 0.0
    before = rows(mixed, "t1")[0].clone(), rows(mixed, "t0")[0].clone()
    train(mixed, steps=1)
    assert torch.equal(rows(mixed, "t1")[0], before[0]) and not torch.equal(rows(mixed, "t0")[0], before[1])


def test_fused_params_that_agree_combine_and_ones_that_disagree_raise():
    agree = rt.convert(apply(ebc(), RowWiseAdagrad, {"lr": 0.1}), fused_params={"learning_rate": 0.1, "eps": 1e-5})
    cfg = agree.fused_optimizer.config
    assert (cfg.optimizer, cfg.learning_rate, cfg.eps) == (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 0.1, 1e-5)
    rt.convert(apply(ebc(), RowWiseAdagrad, {"lr": 0.1}), fused_params={"optimizer": EmbOptimType.ROWWISE_ADAGRAD})
    with pytest.raises(ValueError, match=r"table 't0'.*learning_rate.*0\.05.*0\.1"):
        rt.convert(apply(ebc(), RowWiseAdagrad, {"lr": 0.1}), fused_params={"learning_rate": 0.05})
    with pytest.raises(ValueError, match="optimizer.*disagrees"):
        rt.convert(apply(ebc(), RowWiseAdagrad, {"lr": 0.1}), fused_params={"optimizer": EmbOptimType.ADAM})


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (torch.optim.RMSprop, {"lr": 0.1}, "RMSprop.*cannot be fused"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum=0.9"),
        (trec_optim.SGD, {"lr": 0.1, "nesterov": True}, "nesterov=True"),
        (torch.optim.Adam, {"lr": 0.1, "amsgrad": True}, "amsgrad=True"),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}, "lr_decay=0.01"),
        (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1}, "initial_accumulator_value"),
        (torch.optim.SGD, {"lr": 0.1, "maximize": True}, "maximize=True"),
        (trec_optim.Adam, {"lr": 0.1, "max_gradient": 1.0}, "argument 'max_gradient'"),
        (trec_optim.Adam, {"lr": "fast"}, "lr must be a number"),
    ],
)
def test_optimizers_that_cannot_be_fused_raise_naming_them(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rt.convert(apply(ebc(), cls, kwargs))


def test_two_optimizers_on_one_table_raise():
    model = apply(ebc(), RowWiseAdagrad, {"lr": 0.1})
    apply(model, torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match="applied 2 times"):
        rt.convert(model)


def test_embedding_collection_in_backward_optimizer():
    def ec():
        torch.manual_seed(0)
        return EmbeddingCollection(
            [EmbeddingConfig(name="s", embedding_dim=4, num_embeddings=30, feature_names=["f0"])]
        )

    def run(module):
        outs = []
        for s in range(3):
            out = module(random_kjt(["f0"], 4, 5, num_ids=30, seed=s))["f0"].values()
            (out**2).sum().backward()
            outs.append(out.detach())
        return torch.cat(outs)

    tagged = rt.convert(apply(ec(), torch.optim.Adagrad, {"lr": 0.5}))
    plain = rt.convert(ec(), fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.5})
    assert tagged.fused_optimizer.config == plain.fused_optimizer.config
    torch.testing.assert_close(run(tagged), run(plain), atol=0, rtol=0)


def test_fused_params_that_would_have_no_effect_raise():
    from recis_torchrec.optim.fused import parse_fused_params

    with pytest.raises(ValueError, match=r"\['eps'\] have no effect with optimizer EXACT_SGD"):
        parse_fused_params({"optimizer": EmbOptimType.EXACT_SGD, "eps": 1e-6})
    with pytest.raises(ValueError, match=r"\['beta1'\] have no effect with optimizer EXACT_ROWWISE_ADAGRAD"):
        parse_fused_params({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "beta1": 0.8})
    with pytest.raises(ValueError, match="weight_decay.*no effect with weight_decay_mode NONE"):
        parse_fused_params({"optimizer": EmbOptimType.ADAM, "weight_decay": 0.1})
    # LAMB applies weight_decay itself, as FBGEMM's does; a mode would do nothing.
    assert parse_fused_params({"optimizer": "lamb", "weight_decay": 0.1}).weight_decay == 0.1
    with pytest.raises(ValueError, match=r"\['weight_decay_mode'\] have no effect with optimizer LAMB"):
        parse_fused_params({"optimizer": EmbOptimType.LAMB, "weight_decay": 0.1, "weight_decay_mode": 1})
    with pytest.raises(ValueError, match=r"\['momentum'\] have no effect with optimizer ADAM"):
        parse_fused_params({"optimizer": EmbOptimType.ADAM, "momentum": 0.5})
    with pytest.raises(ValueError, match=r"fused_params\['eta'\] must be > 0, got 0.0"):
        parse_fused_params({"optimizer": "lars_sgd", "eta": 0})
    with pytest.raises(ValueError, match=r"fused_params\['momentum'\] must be in \[0, 1\), got 1.5"):
        parse_fused_params({"optimizer": "lars_sgd", "momentum": 1.5})
    for bad, match in [({"learning_rate": float("nan")}, "finite"), ({"learning_rate": float("inf")}, "finite"),
                       ({"learning_rate": "0.1"}, "must be a number"), ({"learning_rate": -1.0}, ">= 0")]:
        with pytest.raises((ValueError, TypeError), match=match):
            parse_fused_params({"optimizer": EmbOptimType.ADAM, **bad})
    cfg = parse_fused_params({"optimizer": EmbOptimType.ADAM, "eps": 1e-6, "beta1": 0.8, "beta2": 0.9,
                              "weight_decay": 0.1, "weight_decay_mode": 2})
    assert (cfg.eps, cfg.beta1, cfg.beta2, cfg.weight_decay) == (1e-6, 0.8, 0.9, 0.1)
