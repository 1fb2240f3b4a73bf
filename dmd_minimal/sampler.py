"""The teacher's deterministic ODE sampler: Karras schedule and Heun / Euler steps.

EDM (arXiv 2206.00364) Eq. 5 for the schedule and Algorithm 1 (deterministic: S_churn = 0) for the
solver. The probability-flow ODE in EDM's variance-exploding form is dx/dsigma = (x - D(x; sigma)) / sigma.
"""
import torch


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then sigma_N = 0: [num_steps + 1]  (EDM Eq. 5)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    ramp = i / max(num_steps - 1, 1)                     # a single step starts at sigma_max
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])      # sigma_N = 0


@torch.no_grad()
def sample_ode(denoiser, z, num_steps, class_labels=None, solver="heun",
               sigma_min=0.002, sigma_max=80.0, rho=7.0, return_trajectory=False):
    """Integrate the probability-flow ODE from sigma_max z to sigma = 0   (EDM Algorithm 1).

    z is unit-Gaussian noise; the sampler scales it by sigma_max itself. Heun corrects every step
    but the last (which would divide by sigma = 0), so it costs 2 N - 1 network evaluations; Euler
    costs N. num_steps = 1 is a single Euler step: x = D(sigma_max z; sigma_max).
    The ODE runs in z's dtype (float32, or float64 as in EDM's own sampler).
    Returns the samples, or (samples, trajectory [num_steps + 1, *z.shape]) if asked.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"unknown solver {solver!r}; choose 'heun' or 'euler'")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, z.device).to(z.dtype)
    x = z * sigmas[0]
    trajectory = [x]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, sigma, class_labels).to(x.dtype)) / sigma            # dx/dsigma
        x_next = x + (sigma_next - sigma) * d                                     # Euler step
        if solver == "heun" and sigma_next > 0:
            d_next = (x_next - denoiser(x_next, sigma_next, class_labels).to(x.dtype)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2                  # 2nd-order correction
        x = x_next
        trajectory.append(x)
    return (x, torch.stack(trajectory)) if return_trajectory else x
