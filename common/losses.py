"""Distillation losses: RCKA and PCKA (the paper's), and the KD and DKD baselines.

Every CKA term is ``1 - CKA``: non-negative, 0 at perfect alignment, with the same gradients as
the paper's ``-CKA``. Teacher inputs are detached: no loss here ever sends a gradient into the teacher.

One interface for every loss (``DistillationLoss``), so a training loop has no per-method branch:
``terms(*, logits_s, logits_t, feats_s, feats_t, targets, epoch)`` returns the weighted terms by name
(for logs), ``forward(...)`` (same keywords) their sum. Each loss takes what it uses and ignores the
rest, owns its weights and warm-up, and says in ``needs_features`` whether the loop must tap
intermediate features. A loss with parameters or buffers is optimised and checkpointed with the
student by the loop (``criterion.parameters()``, ``criterion.state_dict()``) without other changes.

Defaults reproduce the authors' computation (``--method rcka`` with no other flag is the closest
reproduction we can justify); the principled variants are options. Sources, cited below as [DK] and [PCKA]:
  [DK]   github.com/Klayand/Distill_Knowledge @ 5312bdf6d4d80db5fda7d322796bfc89390c75e2, the first author's
         related code for classification: ``distiller/CKA.py`` (CenterKernelAlignment, cka_loss,
         CenterKernelAlignmentRKD), ``distiller/CKASP.py`` (compute_spcka_loss, DKCKA), ``icme_main.py``.
  [PCKA] github.com/Klayand/PCKA @ cec05def1b728a8bf64b715fd4c46f03ce5f87af, the paper's released detection code:
         ``PCKA/mmrazor/mmrazor/models/losses/cka_loss.py`` and ``configs/distill/mmdet/cka/*.py``.
  * ``centered=False`` by default in both losses: [DK] and [PCKA] never centre, and the published weights
    were tuned for that. ``centered=True`` is CKA as defined (``common.cka``'s own default).
  * RCKA is in neither repository as one class. Its logit terms are [DK]'s CenterKernelAlignmentRKD as
    icme_main.py builds it (intra 15, inter 15, Gram rows normalised); its feature term and weight are
    [DK]'s DKCKA (weight 1, CKA of SP kernels of every stage after the stem). See ``RCKALoss``.
  * PCKA's optional inter term has its own weight here (``inter_weight``); [PCKA] multiplies it by the
    intra weight and uses ``inter_weight`` only as a switch. Its configs pass 10 for both, so equal
    weights reproduce it.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.cka import _promote, linear_cka
from common.cka_variants import gram_cosine, sp_cka
from common.dist import all_gather_with_grad, gather_sizes
from common.patches import check_pair, patch_cka, patchify

__all__ = ["METHODS", "FEATURE_FORMS", "add_cka_arguments", "DistillationLoss", "RCKALoss", "PCKALoss", "KDLoss", "DKDLoss", "build_distillation_loss"]

# The classification methods, in the paper's Table 1 order; tasks, sweeps and reports read this one list.
# ce: the student alone; kd: Hinton et al.; dkd: Zhao et al.; fcka / lcka: the paper's feature / logit
# CKA rows; rcka: both, the paper's method.
METHODS = ("ce", "kd", "dkd", "fcka", "lcka", "rcka")
# The settings each method's loss reads (build_distillation_loss): part of a run's identity for that method only,
# so that a flag a method ignores never splits its runs.
METHOD_SETTINGS = {
    "ce": (),
    "kd": ("kd_weight", "kd_temperature"),
    "dkd": ("dkd_alpha", "dkd_beta", "dkd_temperature", "dkd_warmup"),
    "fcka": ("fcka_weight", "fcka_form", "cka_centered", "cka_batch"),
    "lcka": ("lcka_intra_weight", "lcka_inter_weight", "lcka_row_norm", "cka_centered", "cka_batch"),
    "rcka": ("fcka_weight", "fcka_form", "lcka_intra_weight", "lcka_inter_weight", "lcka_row_norm", "cka_centered",
             "cka_batch"),
}


class DistillationLoss(nn.Module):
    """The interface every distillation loss implements; see the module docstring.

    Subclasses implement ``terms``; all arguments are keyword-only and optional, so a loop passes
    everything it has and each loss takes what it needs (and says clearly what is missing).
    """

    needs_features: bool = False

    def terms(
        self,
        *,
        logits_s: Tensor | None = None,
        logits_t: Tensor | None = None,
        feats_s=None,
        feats_t=None,
        targets: Tensor | None = None,
        epoch: int = 0,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, **inputs) -> Tensor:
        terms = self.terms(**inputs)
        if not terms:
            raise ValueError(f"{type(self).__name__} has every weight at 0: it computes nothing.")
        return sum(terms.values())


def _require(name: str, value, loss: str):
    if value is None:
        raise ValueError(f"{loss} needs {name}= (got None).")
    return value


def _as_list(feats: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None) -> list[Tensor]:
    if feats is None:
        return []
    if isinstance(feats, Tensor):
        return [feats]
    if isinstance(feats, Mapping):
        return list(feats.values())
    return list(feats)


def _paired_levels(feats_s, feats_t) -> list[tuple[str, Tensor, Tensor]]:
    """Pair student and teacher feature maps by key (dicts) or by position (sequences)."""
    if isinstance(feats_s, Mapping) or isinstance(feats_t, Mapping):
        if not (isinstance(feats_s, Mapping) and isinstance(feats_t, Mapping)):
            raise TypeError("pass student and teacher features both as dicts or both as sequences.")
        if list(feats_s) != list(feats_t):
            raise ValueError(
                f"student and teacher feature dicts must have the same keys in the same order; got "
                f"{list(feats_s)} and {list(feats_t)}."
            )
        return [(str(k), feats_s[k], feats_t[k]) for k in feats_s]
    s, t = _as_list(feats_s), _as_list(feats_t)
    if len(s) != len(t):
        raise ValueError(
            f"got {len(s)} student and {len(t)} teacher feature maps; they are compared pairwise, so "
            "pick the same number of stages/levels for both (e.g. --fcka_stages)."
        )
    return [(str(i), a, b) for i, (a, b) in enumerate(zip(s, t))]


FEATURE_FORMS = ("sp", "gram")


def _global_batch(logits_s, logits_t, feats_s, feats_t):
    """Every process's samples, concatenated in rank order (see ``RCKALoss``'s ``cka_batch``)."""
    tensors = [t for t in (logits_s, logits_t, *_as_list(feats_s), *_as_list(feats_t)) if t is not None]
    if not tensors:
        return logits_s, logits_t, feats_s, feats_t
    if len({t.shape[0] for t in tensors}) > 1:
        raise ValueError(
            f"cka_batch='global' gathers whole batches, but the inputs hold different numbers of samples: "
            f"{sorted({t.shape[0] for t in tensors})}; pass student and teacher outputs of the same batch."
        )
    sizes = gather_sizes(tensors[0].shape[0])  # one exchange for all the tensors of this batch

    def gather(value, student: bool):
        if value is None:
            return None
        if isinstance(value, Mapping):
            return {key: gather(v, student) for key, v in value.items()}
        if not isinstance(value, Tensor):
            return [gather(v, student) for v in value]
        if student:
            # Every process computes the same loss from the gathered tensors.
            return all_gather_with_grad(value, sizes, same_loss_everywhere=True)
        return all_gather_with_grad(value.detach(), sizes)

    return gather(logits_s, True), gather(logits_t, False), gather(feats_s, True), gather(feats_t, False)


class RCKALoss(DistillationLoss):
    """RCKA = w_f sum_stages (1 - CKA_f(F_s, F_t)) + w_intra (1 - CKA(Z_s, Z_t)) + w_inter (1 - CKA(Z_s^T, Z_t^T)).

    F are stage features (batch, C, H, W), flattened per sample, so teacher and student need no channel
    adapter (every Gram is batch x batch); Z are logits (batch, classes). A term whose weight is 0 is
    skipped, so FCKA only (``intra_weight=inter_weight=0``) and LCKA only (``feature_weight=0``), the
    paper's FCKA and LCKA rows, are this same class. Cross-entropy is the training loop's.

    The paper gives the terms (its framework figure) but not their weights or the exact CKA; every
    default below is the first author's related code, [DK] in the module docstring:

    * ``centered=False``: [DK]'s ``CenterKernelAlignment`` never centres (cosine of ``X X^T`` and
      ``Y Y^T``). ``True`` centres the columns of every representation first (``common.cka_variants``).
      Uncentred CKA of logits that share an offset starts near 1, so at these weights the LCKA terms
      are gentle regularisers; centred, they dominate the loss (``cifar100/README.md`` measures it).
    * ``logit_row_norm=True``: [DK]'s ``CenterKernelAlignmentRKD`` defaults to ``with_l2_norm=True``,
      dividing each row of the logit Gram by ``sqrt(K_ii)`` (``K = normalize(Z) Z^T``, asymmetric),
      for both logit terms. ``False`` is the plain Gram, as in [PCKA] and the paper's equations.
    * ``feature_form="sp"``: [DK]'s ``DKCKA`` (``distiller/CKASP.py``), the only [DK] class that adds a
      feature term to logit CKA, compares per stage the SP kernels (Gram of flattened features with
      unit-norm rows) by CKA, i.e. the cosine of ``G_hat G_hat^T``. ``"gram"`` is the paper's figure:
      CKA of the batch x batch Grams of the flattened features. Where figure and code differ we
      follow the code by default.
    * ``feature_weight=1``: ``DKCKA(spcka_weight=1.0)``, summed over every stage after the stem
      (``features[1:]``, layer1..layer3 for CIFAR ResNets) as ``spcka_loss`` does.
    * ``intra_weight=15, inter_weight=15``: ``icme_main.py`` builds
      ``CenterKernelAlignmentRKD(inter_weight=15, intra_weight=15)`` for CIFAR-100 and ImageNet
      (``DKCKA``'s ``cka_weight`` is also 15). That class multiplies its inter term by ``intra_weight``
      and uses ``inter_weight`` only as an on/off switch; with both at 15 the two readings agree, so
      here each term simply has its own weight.

    Other choices: ``1 - CKA`` rather than [DK]'s ``-CKA`` (a constant apart: the same gradients,
    non-negative, 0 at perfect alignment). No temperature or softmax on the logits ([DK]'s
    ``soften=False`` default, which ``icme_main.py`` keeps). No warm-up ([DK] has none).

    ``cka_batch`` says over which samples the batch x batch (and class x class) Grams are built under
    several processes. "local" (default): each process's own batch, as the released code does per
    process, so 8 GPUs x 64 images give the mean of eight batch-64 CKAs. "global": every process first
    gathers all processes' logits and features (``common.dist.all_gather_with_grad``; teacher side
    without graph), so the loss is that of one process with the whole batch of 512, and so are the
    gradients after DDP's averaging. Its cost, per step and process: an all_gather of the student's and
    the teacher's logits and tapped features (world_size times their size, held until backward), no
    communication in backward (each process computes the same loss), and Grams over world_size times the
    samples: world_size^2 times the Gram FLOPs of "local". Without a process group both are the same.
    """

    def __init__(
        self,
        feature_weight: float = 1.0,
        intra_weight: float = 15.0,
        inter_weight: float = 15.0,
        centered: bool = False,
        logit_row_norm: bool = True,
        feature_form: str = "sp",
        cka_batch: str = "local",
    ) -> None:
        super().__init__()
        for name, value in (("feature_weight", feature_weight), ("intra_weight", intra_weight), ("inter_weight", inter_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if feature_form not in FEATURE_FORMS:
            raise ValueError(
                f"feature_form must be one of {FEATURE_FORMS} ('sp': the first author's related code, "
                f"'gram': the paper's figure); got {feature_form!r}."
            )
        if cka_batch not in ("local", "global"):
            raise ValueError(f"cka_batch must be 'local' or 'global', got {cka_batch!r}.")
        self.cka_batch = cka_batch
        self.feature_weight = feature_weight
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight
        self.centered = centered
        self.logit_row_norm = logit_row_norm
        self.feature_form = feature_form

    def extra_repr(self) -> str:
        return (
            f"feature_weight={self.feature_weight}, intra_weight={self.intra_weight}, inter_weight={self.inter_weight}, "
            f"centered={self.centered}, logit_row_norm={self.logit_row_norm}, feature_form={self.feature_form!r}"
        )

    @property
    def needs_features(self) -> bool:
        return self.feature_weight > 0

    def _feature_cka(self, fs: Tensor, ft: Tensor) -> Tensor:
        if self.feature_form == "sp":
            return sp_cka(fs, ft, centered=self.centered)
        return linear_cka(fs.flatten(1), ft.flatten(1), centered=self.centered)

    def _logit_cka(self, zs: Tensor, zt: Tensor) -> Tensor:
        return gram_cosine(zs, zt, centered=self.centered, row_norm=self.logit_row_norm)

    def terms(self, *, logits_s=None, logits_t=None, feats_s=None, feats_t=None, targets=None, epoch=0):
        if self.cka_batch == "global":
            # Only what a term with a non-zero weight reads is gathered.
            use_logits, use_feats = self.intra_weight > 0 or self.inter_weight > 0, self.feature_weight > 0
            logits_s, logits_t, feats_s, feats_t = _global_batch(
                logits_s if use_logits else None, logits_t if use_logits else None,
                feats_s if use_feats else None, feats_t if use_feats else None,
            )
        terms: dict[str, Tensor] = {}
        if self.feature_weight > 0:
            pairs = _paired_levels(feats_s, feats_t)
            if not pairs:
                raise ValueError("feature_weight > 0 but no features were given; pass stage features or set it to 0.")
            fcka = pairs[0][1].new_zeros((), dtype=torch.float32)
            for name, fs, ft in pairs:
                if fs.shape[0] != ft.shape[0]:
                    raise ValueError(f"stage {name}: student batch {fs.shape[0]} != teacher batch {ft.shape[0]}.")
                fcka = fcka + (1 - self._feature_cka(fs, ft.detach()))
            terms["fcka"] = self.feature_weight * fcka
        if self.intra_weight > 0 or self.inter_weight > 0:
            _check_logits(_require("logits_s", logits_s, "RCKALoss"), _require("logits_t", logits_t, "RCKALoss"))
            logits_t = logits_t.detach()
            if self.intra_weight > 0:
                terms["lcka_intra"] = self.intra_weight * (1 - self._logit_cka(logits_s, logits_t))
            if self.inter_weight > 0:
                terms["lcka_inter"] = self.inter_weight * (1 - self._logit_cka(logits_s.t(), logits_t.t()))
        return terms


class PCKALoss(DistillationLoss):
    """Patch-based CKA over FPN levels (paper Sec. 4.2).

    For every level, both maps are cut into p x p patches (``common.patches.patchify``) and for each
    channel c the patch x patch Gram matrices of ``X_c`` (patches, B*p*p) are compared:
    ``intra = mean_c (1 - CKA(X_c^s, X_c^t))``. The optional inter term does the same on the
    transposed matrices (Gram over the B*p*p pixel positions). Levels are summed; the intra term
    of a level is one fused operation over all its channels (``common.patches.patch_cka``: resize,
    copies, Grams and CKA per chunk of channels, with a hand-written backward). The paper's weight for the intra term is 10; the
    detection configs pass the first four FPN levels, as the released code does.

    ``centered=False`` by default: [PCKA]'s ``CenterKernelAlignment`` never centres (and does not
    normalise Gram rows: ``with_l2_norm=False`` there). ``centered=True`` is CKA as defined. [PCKA]'s
    configs use intra 10 with inter 10 (Faster/Mask R-CNN, GFL) or intra only (RetinaNet, FCOS,
    RepPoints); ``inter_weight=0`` is the latter.
    """

    def __init__(
        self,
        patch_size: int = 16,
        intra_weight: float = 10.0,
        inter_weight: float = 0.0,
        centered: bool = False,
    ) -> None:
        super().__init__()
        if intra_weight < 0 or inter_weight < 0:
            raise ValueError(f"weights must be >= 0, got intra={intra_weight}, inter={inter_weight}.")
        self.patch_size = patch_size
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight
        self.centered = centered

    needs_features = True

    def terms(self, *, logits_s=None, logits_t=None, feats_s=None, feats_t=None, targets=None, epoch=0):
        pairs = _paired_levels(feats_s, feats_t)
        if not pairs:
            raise ValueError("PCKALoss needs at least one pair of feature maps.")
        intra, inter = [], []
        for name, fs, ft in pairs:
            grid_s = check_pair(fs, ft, self.patch_size, where=f"level {name}: ")
            if self.intra_weight > 0:
                if grid_s[0] * grid_s[1] < 2:
                    # Centred or not: a single patch has a 1 x 1 Gram, whose CKA says nothing.
                    raise ValueError(
                        f"level {name}: a {tuple(fs.shape[-2:])} map gives {grid_s[0] * grid_s[1]} patch of "
                        f"{self.patch_size}x{self.patch_size}; the intra term compares patch x patch Grams "
                        "and needs at least 2 patches. Leave this level out or use a smaller --patch_size."
                    )
                intra.append((1 - patch_cka(fs, ft, self.patch_size, centered=self.centered)).mean())
            if self.inter_weight > 0:
                xs, xt = patchify(fs, self.patch_size), patchify(ft.detach(), self.patch_size)
                inter.append(
                    (1 - linear_cka(xs.transpose(1, 2), xt.transpose(1, 2), centered=self.centered)).mean()
                )
        terms: dict[str, Tensor] = {}
        if intra:
            terms["pcka_intra"] = self.intra_weight * torch.stack(intra).sum()
        if inter:
            terms["pcka_inter"] = self.inter_weight * torch.stack(inter).sum()
        return terms


def _check_logits(logits_s: Tensor, logits_t: Tensor) -> None:
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape:
        raise ValueError(
            f"student and teacher logits must both be (batch, classes) of equal shape; got "
            f"{tuple(logits_s.shape)} and {tuple(logits_t.shape)}."
        )


class KDLoss(DistillationLoss):
    """Hinton et al. (2015): weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch."""

    def __init__(self, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}.")
        self.temperature = temperature
        self.weight = weight

    def terms(self, *, logits_s=None, logits_t=None, feats_s=None, feats_t=None, targets=None, epoch=0):
        logits_s, logits_t = _require("logits_s", logits_s, "KDLoss"), _require("logits_t", logits_t, "KDLoss")
        _check_logits(logits_s, logits_t)
        t = self.temperature
        log_p_s = F.log_softmax(_promote(logits_s) / t, dim=1)
        log_p_t = F.log_softmax(_promote(logits_t.detach()) / t, dim=1)
        return {"kd": self.weight * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t}


class DKDLoss(DistillationLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, each scaled by T^2.

    TCKD is the KL divergence of the binary (target, rest) distributions; NCKD the KL divergence of
    the distributions over the non-target classes only. We compute both exactly in log space
    (logsumexp over the non-target classes) rather than with the -1000 logit mask of the
    reference implementation; the values agree to float precision. The CIFAR-100 defaults are the
    DKD paper's (alpha 1, beta 8, T 4). Both terms ramp up linearly over the first ``warmup_epochs``
    epochs, by ``min((epoch + 1) / warmup_epochs, 1)`` with 0-based epochs, as the reference
    implementation's ``min(epoch / warmup, 1)`` does with 1-based ones (DKD paper: 20 on CIFAR-100).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs

    def terms(self, *, logits_s=None, logits_t=None, feats_s=None, feats_t=None, targets=None, epoch=0):
        logits_s, logits_t = _require("logits_s", logits_s, "DKDLoss"), _require("logits_t", logits_t, "DKDLoss")
        target = _require("targets", targets, "DKDLoss")
        _check_logits(logits_s, logits_t)
        if target.shape != logits_s.shape[:1]:
            raise ValueError(f"target must be (batch,) class indices; got {tuple(target.shape)}.")
        t = self.temperature
        zs, zt = _promote(logits_s) / t, _promote(logits_t.detach()) / t
        batch, classes = zs.shape
        is_target = F.one_hot(target, classes).bool()
        # Log-probabilities of the binary (target, non-target) split.
        lse_s, lse_t = zs.logsumexp(1), zt.logsumexp(1)
        rest_s = zs.masked_select(~is_target).view(batch, classes - 1)
        rest_t = zt.masked_select(~is_target).view(batch, classes - 1)
        log_bin_s = torch.stack([zs.masked_select(is_target) - lse_s, rest_s.logsumexp(1) - lse_s], dim=1)
        log_bin_t = torch.stack([zt.masked_select(is_target) - lse_t, rest_t.logsumexp(1) - lse_t], dim=1)
        tckd = F.kl_div(log_bin_s, log_bin_t, reduction="batchmean", log_target=True) * t * t
        nckd = (
            F.kl_div(F.log_softmax(rest_s, 1), F.log_softmax(rest_t, 1), reduction="batchmean", log_target=True)
            * t
            * t
        )
        ramp = min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return {"tckd": ramp * self.alpha * tckd, "nckd": ramp * self.beta * nckd}


def build_distillation_loss(method: str, settings) -> DistillationLoss | None:
    """The loss of a classification method (``METHODS``) from resolved settings (an argparse.Namespace or a
    dict with the tasks' shared flag names, ``METHOD_SETTINGS``). None for ``ce``."""
    get = settings.get if isinstance(settings, Mapping) else lambda key: getattr(settings, key)
    if method == "ce":
        return None
    if method == "kd":
        return KDLoss(get("kd_temperature"), get("kd_weight"))
    if method == "dkd":
        return DKDLoss(get("dkd_alpha"), get("dkd_beta"), get("dkd_temperature"), get("dkd_warmup"))
    if method in ("fcka", "lcka", "rcka"):
        return RCKALoss(
            feature_weight=get("fcka_weight") if method in ("fcka", "rcka") else 0.0,
            intra_weight=get("lcka_intra_weight") if method in ("lcka", "rcka") else 0.0,
            inter_weight=get("lcka_inter_weight") if method in ("lcka", "rcka") else 0.0,
            centered=get("cka_centered"),
            logit_row_norm=get("lcka_row_norm"),
            feature_form=get("fcka_form"),
            cka_batch=get("cka_batch"),
        )
    raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def add_cka_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of RCKA's CKA terms, the same in every classification task: weights and forms of the first
    author's related code ([DK] in the module docstring) as defaults, each citing its source. FCKA's stages are
    the task's (they name its architectures' modules)."""
    parser.add_argument("--fcka_weight", type=float, default=1.0,
                        help="weight of L_FCKA (the paper gives none; the first author's related code, "
                             "Klayand/Distill_Knowledge@5312bdf distiller/CKASP.py DKCKA(spcka_weight=1.0), uses 1)")
    parser.add_argument("--lcka_intra_weight", type=float, default=15.0,
                        help="weight of L_Intra-LCKA, CKA of batch x batch logit Grams (related code: icme_main.py "
                             "builds CenterKernelAlignmentRKD(intra_weight=15))")
    parser.add_argument("--lcka_inter_weight", type=float, default=15.0,
                        help="weight of L_Inter-LCKA, CKA of class x class logit Grams (related code: icme_main.py "
                             "passes inter_weight=15; that class scales the inter term by intra_weight, so equal "
                             "values reproduce it)")
    parser.add_argument("--fcka_form", default="sp", choices=FEATURE_FORMS,
                        help="sp (default): CKA of the SP kernels (batch x batch Grams with unit-norm rows) of "
                             "flattened stage features, as DKCKA / compute_spcka_loss in the related code "
                             "(distiller/CKASP.py); gram: CKA of the plain batch x batch Grams (the paper's "
                             "framework figure)")
    parser.add_argument("--lcka_row_norm", action=argparse.BooleanOptionalAction, default=True,
                        help="divide each row of the logit Grams by sqrt(K_ii), as CenterKernelAlignmentRKD("
                             "with_l2_norm=True) in the related code (distiller/CKA.py), which icme_main.py keeps "
                             "(default); --no-lcka_row_norm gives the plain Gram of the paper's equations")
    parser.add_argument("--cka_centered", action=argparse.BooleanOptionalAction, default=False,
                        help="centre each representation before its Gram (true CKA). Default off: the authors' "
                             "CKA never centres (related code distiller/CKA.py CenterKernelAlignment; the released "
                             "Klayand/PCKA cka_loss.py), and the weights above were tuned for that")
    parser.add_argument("--cka_batch", default="local", choices=("local", "global"),
                        help="the samples RCKA's batch x batch and class x class Grams are built from when several "
                             "processes train: local (default) = each process's own batch, as the released code "
                             "does per process; global = all processes' samples, gathered with gradients, so N "
                             "GPUs x b images give the loss of one GPU with N*b (costs an all_gather of logits and "
                             "tapped features and N^2 times the Gram FLOPs)")
