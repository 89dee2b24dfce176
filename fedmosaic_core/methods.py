"""How each federated method trains a client's dual-branch adapter (one owner for the method table).

Every client model carries two adapter branches per adapted layer, mixed as
``h = W·x + β·G(x) + (1 − β)·L(x)`` (:mod:`fedmosaic_core.pqlora.layer`). A method says, for
each local step, which parameters train and how the output is formed; which branch it uploads;
where the server's aggregate goes; how it is evaluated; how the server aggregates; and its
share of the compute budget. The baselines follow the reference implementation
(snumprlab/fedmosaic, ``federated_methods/``), where its ``lora1`` is our global branch G and
``lora2`` our local branch L:

- ``fedmosaic`` / ``fedmosaic-uniform``: train L and the gate on ``h`` with the learned β;
  upload L; the server's per-client mix (RELA / equal weights) goes into G.
- ``local``: the same, with nothing shared (G stays 0).
- ``fedavg``: one adapter. The group mean replaces L; G stays 0.
- ``rela-fedavg`` (beyond the paper, opt-in): FedAvg's client on RELA's server with the client in
  its own mix: L_i ← Σ_j w_ij L_j over every j, i included (softmax of s_ij / τ, s_ii = 1), P/Q
  across architectures and plain LoRA within one, as FedMosaic mixes them; G stays 0. One
  adapter per client, averaged mostly with itself and its most relevant peers.
- ``fedavg-dual``: L and the gate train as in FedMosaic; G is the architecture group's mean.
- ``feddpa`` (FedDPA-F): the first half of the steps trains G alone (β = 1) from the received
  mean; the second half freezes G and trains L and the gate on the mix. Upload G; evaluate the mix.
- ``ditto``: every batch makes two steps, G alone (β = 1) on the task loss, then L alone (β = 0)
  on the task loss + μ‖L − G₀‖² (G₀: G at the round's start, μ = 0.001). Upload G; evaluate L.
- ``fedsim``: one step trains G and L together on ``logits(β = 1) + logits(β = 0)``. Upload G;
  evaluate with the same logit sum.
- ``fedmosaic-trained-global`` (beyond the paper, opt-in): RELA's server with FedDPA's client.
  The received per-client mix goes into G; the first half of the steps trains G alone (β = 1)
  from it, the second half freezes G and trains L and the gate. Upload G; evaluate the mix.
  ``fedmosaic-uniform-trained-global``: the same with equal weights (RELA off).
- ``fedmosaic-joint-global`` (beyond the paper, opt-in): RELA's server; every step trains G, L and
  the gate together on the mix ``h`` with the learned β, so L gets every step (as under
  ``fedmosaic``) and G learns the client's task on top of the received mix. Upload G; evaluate the mix.

Compute shares are the reference's equal-compute local iterations (SFT / FedAvg / FedDPA 100,
FedSim 75, Ditto 50 batches of two steps, FedMosaic 94), as fractions of ``local-steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: how a step forms the output: a fixed β, the learned gate (``None``), or the sum of the
#: logits of the global branch alone and the local branch alone
Output = float | None | Literal["logit-sum"]
LOGIT_SUM_BETAS = (1.0, 0.0)
DITTO_MU = 0.001


@dataclass(frozen=True)
class Phase:
    """One optimiser step: the parameter groups that train (``local``, ``gate``, ``global``), the
    output, and μ of the proximal term μ‖L − G₀‖² (0: none)."""

    trains: frozenset[str]
    output: Output = None
    proximal: float = 0.0


MIX = Phase(frozenset({"local", "gate"}))
JOINT = Phase(frozenset({"global", "local", "gate"}))
GLOBAL_ALONE = Phase(frozenset({"global"}), output=1.0)


@dataclass(frozen=True)
class LocalMethod:
    """A method's client side and its server aggregation mode (:mod:`fedmosaic_core.rela.aggregation`)."""

    name: str
    aggregation: str
    upload: Literal["local", "global"] = "local"
    receive: Literal["local", "global"] = "global"
    evaluate: Output = None
    compute_share: float = 1.0
    task_vectors: bool = False  # the client computes RELA task vectors
    include_self: bool = False  # the server keeps the client in its own mix, whatever ``include-self`` says
    #: the optimiser steps of one local iteration: ``mix`` (L and the gate on the mix),
    #: ``global-then-mix`` (FedDPA), ``joint`` (G, L and the gate on the mix), ``ditto`` or ``fedsim``
    steps: Literal["mix", "global-then-mix", "joint", "ditto", "fedsim"] = "mix"

    @property
    def trains_global(self) -> bool:
        return self.upload == "global"

    def phases(self, step: int, steps: int) -> tuple[Phase, ...]:
        """The optimiser steps made on local iteration ``step`` of ``steps`` (one batch each)."""
        if self.steps == "global-then-mix":
            return (GLOBAL_ALONE,) if step < steps // 2 else (MIX,)
        if self.steps == "joint":
            return (JOINT,)
        if self.steps == "ditto":
            return (GLOBAL_ALONE, Phase(frozenset({"local"}), output=0.0, proximal=DITTO_MU))
        if self.steps == "fedsim":
            return (Phase(frozenset({"global", "local"}), output="logit-sum"),)
        return (MIX,)

    def local_iterations(self, local_steps: int, equal_compute: bool) -> int:
        """Batches per round: ``local-steps`` scaled by the compute share (when ``equal_compute``)."""
        return max(1, round(local_steps * self.compute_share)) if equal_compute else local_steps


METHODS: dict[str, LocalMethod] = {
    m.name: m
    for m in (
        LocalMethod("fedmosaic", "fedmosaic", compute_share=0.94, task_vectors=True),
        LocalMethod("fedmosaic-uniform", "fedmosaic-uniform", compute_share=0.94),
        LocalMethod("fedmosaic-trained-global", "fedmosaic", upload="global", compute_share=0.94,
                    task_vectors=True, steps="global-then-mix"),
        LocalMethod("fedmosaic-uniform-trained-global", "fedmosaic-uniform", upload="global", compute_share=0.94,
                    steps="global-then-mix"),
        LocalMethod("fedmosaic-joint-global", "fedmosaic", upload="global", compute_share=0.94, task_vectors=True,
                    steps="joint"),
        LocalMethod("fedavg", "fedavg", receive="local"),
        LocalMethod("rela-fedavg", "fedmosaic", receive="local", task_vectors=True, include_self=True),
        LocalMethod("fedavg-dual", "fedavg"),
        LocalMethod("feddpa", "fedavg", upload="global", steps="global-then-mix"),
        LocalMethod("ditto", "fedavg", upload="global", evaluate=0.0, compute_share=0.5, steps="ditto"),
        LocalMethod("fedsim", "fedavg", upload="global", evaluate="logit-sum", compute_share=0.75, steps="fedsim"),
        LocalMethod("local", "local"),
    )
}


def method(name: str) -> LocalMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(METHODS)}") from None
