"""Closed-form truths for tests: Gaussian (mixture) data transported by an interpolant.

For data x1 ~ sum_k pi_k N(m_k, S_k) and x_t = a x1 + s x0, x0 ~ N(0, I):
component k of x_t is N(a m_k, Sigma_k = a^2 S_k + s^2 I), and by Gaussian conditioning
    E_k[x1 | x_t = x] = m_k + a S_k Sigma_k^{-1} (x - a m_k),   E_k[x0 | x_t = x] = s Sigma_k^{-1} (x - a m_k).
The exact velocity is a' E[x1 | x] + s' E[x0 | x], the component posteriors r_k(x) mixing the
per-component expectations. Everything in float64, x of shape (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.interpolants import Interpolant


@dataclass(frozen=True)
class GaussianMixture:
    weights: Tensor  # (K,)
    means: Tensor  # (K, D)
    covs: Tensor  # (K, D, D)

    @staticmethod
    def single(mean, cov) -> "GaussianMixture":
        mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
        return GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None], cov[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> Tensor:
        centred = self.means - self.mean()
        outer = centred[:, :, None] * centred[:, None, :]
        return (self.weights[:, None, None] * (self.covs + outer)).sum(0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ z[:, :, None])[:, :, 0]

    def _components(self, interp: Interpolant, x: Tensor, t: Tensor):
        """Per-component (r_k, E_k[x1|x], E_k[x0|x], Sigma_k^{-1}(x - a m_k)), shapes (N,K), (N,K,D) x3."""
        a, s = interp.alpha(t)[:, None, None, None], interp.sigma(t)[:, None, None, None]  # (N,1,1,1)
        eye = torch.eye(self.dim, dtype=x.dtype)
        sigma_t = a**2 * self.covs[None] + s**2 * eye  # (N, K, D, D)
        centred = x[:, None, :] - a[..., 0] * self.means[None]  # (N, K, D)
        solved = torch.linalg.solve(sigma_t, centred[..., None])[..., 0]  # (N, K, D)
        log_det = torch.linalg.slogdet(sigma_t)[1]  # (N, K)
        log_r = self.weights.log()[None] - 0.5 * (log_det + (centred * solved).sum(-1))
        r = torch.softmax(log_r, dim=1)
        e_x1 = self.means[None] + a[..., 0] * (self.covs[None] @ solved[..., None])[..., 0]
        e_x0 = s[..., 0] * solved
        return r, e_x1, e_x0, solved

    def posterior_means(self, interp: Interpolant, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x1 | x_t = x], E[x0 | x_t = x]), each (N, D)."""
        r, e_x1, e_x0, _ = self._components(interp, x, t)
        return (r[..., None] * e_x1).sum(1), (r[..., None] * e_x0).sum(1)

    def velocity(self, interp: Interpolant, x: Tensor, t: Tensor) -> Tensor:
        e_x1, e_x0 = self.posterior_means(interp, x.double(), t.double())
        v = interp.d_alpha(t.double())[:, None] * e_x1 + interp.d_sigma(t.double())[:, None] * e_x0
        return v.to(x.dtype)

    def score(self, interp: Interpolant, x: Tensor, t: Tensor) -> Tensor:
        r, _, _, solved = self._components(interp, x, t)
        return -(r[..., None] * solved).sum(1)

    def log_density(self, x: Tensor) -> Tensor:
        """log p(x1 = x), (N,)."""
        dist = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covs)
        return torch.logsumexp(dist.log_prob(x[:, None, :]) + self.weights.log(), dim=1)

    def flow_map(self, interp: Interpolant, x: Tensor, t0: float, t1: float) -> Tensor:
        """The exact probability-flow map of one Gaussian from time t0 to t1 (either direction).

        Every Sigma_t = a^2 S + s^2 I shares S's eigenvectors, so each eigen-direction is a 1-D
        Gaussian flow, which keeps the standardised coordinate z = Sigma_t^{-1/2} (x - a m) fixed.
        """
        values, vectors = torch.linalg.eigh(self.covs[0])

        def mean_and_root(t: float) -> tuple[Tensor, Tensor]:
            a, s = (f(torch.tensor(t, dtype=torch.float64)) for f in (interp.alpha, interp.sigma))
            return a * self.means[0], vectors @ torch.diag((a**2 * values + s**2).sqrt()) @ vectors.T

        mean0, root0 = mean_and_root(t0)
        mean1, root1 = mean_and_root(t1)
        z = torch.linalg.solve(root0, (x - mean0).T).T
        return mean1 + z @ root1.T


@dataclass(frozen=True)
class ExactVelocity:
    """The closed-form velocity of `data` under `interp`, as a sampler's velocity(x, t) callable."""

    data: GaussianMixture
    interp: Interpolant

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.data.velocity(self.interp, x, t)
