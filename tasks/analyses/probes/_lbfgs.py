"""Why this module exists: G independent minimisations (one per site) in one batch of tensor operations,
each with its own L-BFGS history, line search and stopping test. torch.optim.LBFGS keeps one history, one
line search and one stop for all its parameters, so sites fit together through it would share them and a
site's result would depend on the sites batched beside it; here it does not (up to the float rounding of
batched products), and a finished site leaves the batch.

`minimise`: preconditioned L-BFGS (a diagonal inverse-Hessian estimate per site as the initial matrix,
scaled by the latest curvature pair), Armijo backtracking with the float rounding of the loss as slack,
until the site's gradient norm <= its tolerance, its line search stalls, or `max_iter` iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

HISTORY = 10  # curvature pairs kept per site
LINE_SEARCH_HALVINGS = 30


class Objective(Protocol):
    """A batch of G objectives of flat parameters (G, p)."""

    def __call__(self, theta: Any) -> tuple[Any, Any]:
        """(G,) float64 values and (G, p) gradients at `theta`."""

    def keep(self, index: Any) -> Objective:
        """The objectives at positions `index` of the batch only."""


@dataclass(frozen=True)
class Minimum:
    """Where each site's minimisation stopped: parameters (G, p), gradients (G, p), iterations (G,)."""

    theta: Any
    gradient: Any
    iterations: Any


def _dot(a: Any, b: Any) -> Any:
    """(G,) row-wise inner products of two (G, p) tensors, with no (G, p) temporary."""
    import torch

    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _two_loop(grad: Any, steps: Any, changes: Any, rho: Any, order: Sequence[int], initial: Any) -> Any:
    """-H grad per site by the L-BFGS two-loop recursion over the (newest first) `order` of the history,
    from the diagonal initial matrix `initial` (G, p). In place on one copy of `grad`: large temporaries
    cost a fresh memory mapping each in Dask workers (their malloc trims eagerly)."""
    q = grad.clone()
    alphas = []
    for j in order:
        alphas.append(rho[j] * _dot(steps[j], q))
        q.addcmul_(alphas[-1][:, None], changes[j], value=-1)
    q.mul_(initial)
    for j, alpha in zip(reversed(order), reversed(alphas)):
        q.addcmul_(steps[j], (alpha - rho[j] * _dot(changes[j], q))[:, None])
    return q.neg_()


def minimise(objective: Objective, theta: Any, precondition: Any, norm_tol: Any, *, max_iter: int,
             history: int = HISTORY) -> Minimum:
    """Minimise every site's objective from `theta` (G, p): `precondition` (G, p) a positive diagonal
    estimate of each site's inverse Hessian, `norm_tol` (G,) the gradient norm each site stops at."""
    import torch

    g = theta.shape[0]
    dev, dtype = theta.device, theta.dtype
    loss, grad = objective(theta)
    final_theta, final_grad = theta.clone(), grad.clone()
    members = torch.arange(g, device=dev)  # the sites still iterating, as positions in the batch
    steps = torch.zeros(history, *theta.shape, dtype=dtype, device=dev)
    changes, rho = torch.zeros_like(steps), torch.zeros(history, g, dtype=dtype, device=dev)
    gamma = torch.ones(g, dtype=dtype, device=dev)  # the first step: -precondition * grad
    active = grad.norm(dim=1) > norm_tol
    iterations = torch.zeros(g, dtype=torch.int64, device=dev)
    slack = 8 * float(torch.finfo(dtype).eps)
    for it in range(max_iter):
        if not bool(active.any()):
            break
        if 2 * int(active.sum()) <= members.numel():  # drop the finished sites from the batch
            final_theta[members], final_grad[members] = theta, grad
            keep = active.nonzero().squeeze(1)
            members, objective, precondition = members[keep], objective.keep(keep), precondition[keep]
            theta, loss, grad, gamma, active, norm_tol = (t[keep] for t in (theta, loss, grad, gamma, active,
                                                                            norm_tol))
            steps, changes, rho = steps[:, keep], changes[:, keep], rho[:, keep]
        initial = gamma[:, None] * precondition
        order = [(it - 1 - j) % history for j in range(min(it, history))]
        direction = _two_loop(grad, steps, changes, rho, order, initial)
        slope = _dot(grad, direction)
        uphill = active & (slope >= 0)
        if bool(uphill.any()):  # a stale history: that site restarts from the preconditioned steepest descent
            descent = -initial * grad
            direction = torch.where(uphill[:, None], descent, direction)
            slope = torch.where(uphill, _dot(grad, descent), slope)
        direction.mul_(active[:, None])
        slope = slope.double()
        step, pending = torch.ones_like(gamma), active.clone()
        new_theta, new_loss, new_grad = theta, loss, grad
        for _ in range(LINE_SEARCH_HALVINGS):
            trial = torch.addcmul(theta, step[:, None], direction)
            trial_loss, trial_grad = objective(trial)
            accept = pending & (trial_loss <= loss + 1e-4 * step.double() * slope + slack * loss.abs())
            new_theta = torch.where(accept[:, None], trial, new_theta)
            new_loss = torch.where(accept, trial_loss, new_loss)
            new_grad = torch.where(accept[:, None], trial_grad, new_grad)
            pending &= ~accept
            if not bool(pending.any()):
                break
            step = torch.where(pending, step / 2, step)
        moved = active & ~pending
        slot = it % history
        s_k, y_k = torch.sub(new_theta, theta, out=steps[slot]), torch.sub(new_grad, grad, out=changes[slot])
        sy = _dot(s_k, y_k)
        curvature = moved & (sy > 1e-10 * s_k.norm(dim=1) * y_k.norm(dim=1))
        s_k.mul_(curvature[:, None])
        y_k.mul_(curvature[:, None])
        rho[slot] = torch.where(curvature, 1.0 / torch.where(curvature, sy, 1.0), 0.0)
        gamma = torch.where(curvature, sy / torch.clamp(_dot(precondition * y_k, y_k), min=1e-30), gamma)
        theta, loss, grad = new_theta, new_loss, new_grad
        iterations[members] += active.long()
        active = moved & (grad.norm(dim=1) > norm_tol)
    final_theta[members], final_grad[members] = theta, grad
    return Minimum(final_theta, final_grad, iterations)
