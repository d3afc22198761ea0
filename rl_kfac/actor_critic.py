"""The RL layer that our agents (``agents/``) and the Stable-Baselines3 classes share.

- The parameter groups of an actor-critic network (:func:`kfac_param_groups`): the Gaussian
  log-std, optionally, preconditioned by its exact Fisher.
- The Fisher loss of an actor-critic network: the policy's sampled-Fisher loss plus
  ``vf_fisher_coef`` times the value head's Gauss-Newton term (:mod:`rl_kfac.fisher`; ACKTR,
  Wu et al. 2017, §3.1), back-propagated by :func:`record_fisher` only when statistics are due.
- Damping adaptation after an update: toward a target KL(π_old ‖ π_new)
  (:func:`adapt_damping_to_kl`) or by the Levenberg-Marquardt reduction ratio
  (:func:`adapt_damping_lm`); both read and set the optimizer's λ.
- Trust-region adaptation after an update: the radius ``kl_clip`` toward a target measured KL
  (:func:`adapt_kl_clip`, :class:`rl_kfac.trust_region.KLClipController`).
- Diagnostics: ``KFAC.diagnostics`` (:class:`rl_kfac.diagnostics.Diagnostics`) gives the logged
  scalars under the ``kfac/*`` tags both paths use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from rl_kfac.damping import KLDampingController, LevenbergMarquardt
from rl_kfac.fisher import GAUSSIAN_LOG_STD_FISHER, value_fisher_loss
from rl_kfac.optimizer import KFAC
from rl_kfac.trust_region import KLClipController


def kfac_param_groups(
    module: nn.Module,
    log_std: Tensor | None,
    log_std_fisher: bool,
    value_params: Iterable[Tensor] = (),
    vf_kl_clip: float | None = None,
) -> list[dict[str, Any]]:
    """``module``'s trainable parameters as one group; with ``log_std_fisher`` its
    state-independent Gaussian log-std ``log_std`` in a group of its own, preconditioned by its
    exact Fisher :data:`~rl_kfac.fisher.GAUSSIAN_LOG_STD_FISHER` instead of taking the plain
    gradient; with ``vf_kl_clip`` the parameters only the value depends on (``value_params``) in
    a group with that trust region of its own (``inf``: unclipped), so that the value head's
    Gauss-Newton term no longer spends the policy's (a group ``kl_clip``, see
    :class:`~rl_kfac.KFAC`). Build the optimizer with ``KFAC(groups, model=module)``."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = []
    if vf_kl_clip is not None:
        critic = {id(p) for p in value_params if p.requires_grad}
        if not critic:
            raise ValueError("vf_kl_clip needs parameters only the value uses; this model has none")
        if not critic <= {id(p) for p in params}:
            raise ValueError("the value parameters must be trainable parameters of the module")
        groups.append({"params": [p for p in params if id(p) in critic], "kl_clip": vf_kl_clip})
        params = [p for p in params if id(p) not in critic]
    if log_std_fisher:
        if log_std is None:
            raise ValueError(
                "log_std_fisher needs a Gaussian policy (Box actions); this one has none"
            )
        if not any(p is log_std for p in params):
            raise ValueError("log_std must be a trainable parameter of the module")
        params = [p for p in params if p is not log_std]
        groups.insert(0, {"params": [log_std], "fisher_diagonal": GAUSSIAN_LOG_STD_FISHER})
    return [{"params": params}, *groups]


def actor_critic_fisher_loss(policy_loss: Tensor, values: Tensor, vf_fisher_coef: float) -> Tensor:
    """``policy_loss + vf_fisher_coef · value_fisher_loss(values)``.

    The coefficient scales the loss, hence its gradients, so the value head's Fisher (its ``G``)
    is ``vf_fisher_coef²``: 1 at the default, the σ = 1 Gaussian of the ACKTR paper. OpenAI
    baselines' and ikostrikov's ACKTR code write the term as ``vf_fisher_coef · (v − t)²``
    (no ½), whose gradient ``2ε`` gives 4 at their default of 1; ``vf_fisher_coef = 2`` here.
    At ``vf_fisher_coef = 0`` the value head still gets statistics: its G is 0, so only the
    damping preconditions it.
    """
    return policy_loss + vf_fisher_coef * value_fisher_loss(values)


def record_fisher(
    optimizer: KFAC,
    policy_loss: Callable[[], Tensor],
    values: Tensor,
    vf_fisher_coef: float,
    rows: Tensor | None = None,
) -> None:
    """Record K-FAC statistics from the actor-critic Fisher loss, if they are due.

    ``policy_loss`` builds the policy's sampled-Fisher loss (e.g. ``dist.fisher_loss``); it is
    called, and actions sampled, only when the optimizer records statistics at this step. With
    ``rows`` (a boolean mask; ``policy_loss`` covers those rows only) only those rows have loss
    terms, still averaged over all rows (the padding of recurrent minibatches).
    """
    if not optimizer.statistics_due or (rows is not None and not bool(rows.any())):
        return
    if rows is None:
        optimizer.fisher_backward(actor_critic_fisher_loss(policy_loss(), values, vf_fisher_coef))
        return
    loss = actor_critic_fisher_loss(policy_loss(), values[rows], vf_fisher_coef)
    optimizer.fisher_backward(rows.float().mean() * loss)


def adapt_damping_to_kl(
    optimizer: KFAC, controller: KLDampingController, kl: float, initial_lr: float | None = None
) -> float:
    """Move λ toward the controller's target KL given the update's measured KL; the new λ.
    With ``initial_lr`` the target follows the learning-rate schedule: it is scaled by the
    square of the optimizer's current lr over ``initial_lr``
    (:meth:`~rl_kfac.damping.KLDampingController.update`). Whether the clip shortened the
    update is read from the optimizer's last ν, as :func:`adapt_kl_clip` does, and whether the
    KL guard rejected one of its steps from :meth:`KFAC.pop_rejected_steps`."""
    fraction = 1.0 if not initial_lr else optimizer.param_groups[0]["lr"] / initial_lr
    clipped, rejected = optimizer.diagnostics.clipped, optimizer.pop_rejected_steps() > 0
    damping = controller.update(optimizer.damping, kl, fraction, clipped, rejected)
    optimizer.set_damping(damping)
    return damping


def adapt_damping_lm(optimizer: KFAC, rule: LevenbergMarquardt, actual: float, lr: float) -> float:
    """Levenberg-Marquardt: compare the loss change ``actual`` of the last step (taken with
    learning rate ``lr``) with the damped quadratic model's prediction; the new λ."""
    diag = optimizer.diagnostics
    predicted = LevenbergMarquardt.predicted_change(diag.quadratic, lr * diag.step_scale)
    damping = rule.update(optimizer.damping, actual, predicted)
    optimizer.set_damping(damping)
    return damping


def adapt_kl_clip(optimizer: KFAC, controller: KLClipController, kl: float) -> float:
    """Move the trust-region radius toward the controller's target given the update's measured
    KL; the new radius. Whether the clip shortened the step is read from the optimizer's last
    ν (a PPO-KFAC update's last minibatch step stands for the update). Under
    ``kl_clip_lr="initial"`` the radius is decided at the initial learning rate and a schedule
    shrinks the step's KL by ``lr_fraction²``, so the KL is compared at the initial rate too
    (else the controller would widen the radius as the schedule decays)."""
    assert optimizer.kl_clip is not None  # the config checks refuse a controller without one
    fraction = optimizer.lr_fraction
    if fraction <= 0:  # the rate reached 0: no step was taken
        return optimizer.kl_clip
    kl_clip = controller.update(optimizer.kl_clip, kl / fraction**2, optimizer.diagnostics.clipped)
    optimizer.set_kl_clip(kl_clip)
    return kl_clip
