"""GSPO math: group-standardised advantages and the clipped sequence-ratio loss. Pure tensor functions.

Symbols follow ../shared/docs/tagpr-method.md (Stage 2): for each prompt, G responses y_1..y_G are sampled from pi_old;
  s_i = exp( (1/|y_i|) * sum_t [log pi_theta(y_it | ...) - log pi_old(y_it | ...)] )      (sequence ratio)
  A_i = (r_i - mean(r)) / std(r)                                                          (group advantage)
  J   = E[ (1/G) sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ) ]
No torch.distributed here: the caller all-reduces counts and passes them in (see `gspo_loss(num_sequences=...)`).
"""
from __future__ import annotations

import torch


def _check_rewards(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        index = int(bad[0, 0])
        raise ValueError(f"non-finite reward {rewards[index].item()} at index {index} "
                         f"(prompt {index // group_size}, sample {index % group_size})")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each consecutive group of `group_size` rewards.

    rewards: (B*G,), the G samples of a prompt adjacent. Returns (B*G,) in float32 (float64 if rewards are).
    std is the biased (population) std, dividing by G: it standardises the group actually sampled, so the
    advantages of a group have mean 0 and mean square 1 (up to eps) whatever G is; the unbiased estimate (TRL's
    default) would scale every advantage by sqrt((G-1)/G), 0.89 at G = 5, a step-size change tied to G.
    A group whose rewards are all equal has no signal: its advantages are exactly 0 (not (r - mean) / eps, which
    rounding in the mean would turn into noise); `group_advantage_metrics` counts such groups.
    """
    _check_rewards(rewards, group_size)
    out_dtype = rewards.dtype if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(torch.float64).view(-1, group_size)  # (B, G) fp64: the mean/std of a few values, exactly
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    std = r.std(dim=1, correction=0, keepdim=True)  # (B, 1) biased, see docstring
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (B, 1) zero-variance groups
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))  # (B, G)
    return adv.reshape(-1).to(out_dtype)


def group_advantage_metrics(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> dict[str, float]:
    """Python floats for logging: reward mean/std, mean within-group std, zero-variance group count and share,
    and advantage mean/std/min/max (as `group_advantages` computes them)."""
    adv = group_advantages(rewards, group_size, eps).double()  # (B*G,)
    r = rewards.to(torch.float64).view(-1, group_size)  # (B, G)
    flat = r.amax(dim=1) == r.amin(dim=1)  # (B,)
    stats = torch.stack([
        r.mean(), r.std(correction=0), r.std(dim=1, correction=0).mean(),
        flat.sum(), flat.double().mean(),
        adv.mean(), adv.std(correction=0), adv.min(), adv.max(),
    ]).tolist()  # one device sync for all of them
    keys = ("reward_mean", "reward_std", "reward_group_std_mean", "zero_variance_groups", "zero_variance_share",
            "adv_mean", "adv_std", "adv_min", "adv_max")
    return dict(zip(keys, stats))


def advantage_correlations(rewards: torch.Tensor, terms: dict[str, torch.Tensor], group_size: int,
                           eps: float = 1e-6) -> dict[str, float]:
    """How closely the group advantages follow each reward term. rewards: (B*G,) r_i; terms: name -> (B*G,) t_k,
    e.g. the additive terms of r (rewards.reward_terms). Per group, corr_g(A, t_k) (= corr_g(r, t_k): A is r
    shifted and scaled), 0 where t_k is constant in the group; returned is its mean over groups weighted by each
    group's mean A^2 (1 for a group with signal, 0 for one that `group_advantages` zeroes, less for a group whose
    spread is near eps). 1: the advantages rank every group's responses as this term does; 0: no relation (a
    shuffled reward); below 0: against it. A correlation, not a share of a sum: terms that cancel within a group
    (a wrong answer with good tags vs a right one with bad tags) keep it bounded. {} when no group has signal."""
    adv = group_advantages(rewards, group_size, eps).to(torch.float64).view(-1, group_size)  # (B, G), checks rewards
    adv_sq = (adv * adv).sum(dim=1)  # (B,)
    energy = adv_sq / group_size  # (B,) mean A^2: the weight of each group
    if not bool((energy > 0).any()):
        return {}
    out = {}
    for name, t in terms.items():
        if t.shape != rewards.shape:
            raise ValueError(f"advantage_correlations: term {name!r} has shape {tuple(t.shape)}, "
                             f"the rewards {tuple(rewards.shape)}")
        tc = t.to(torch.float64).view(-1, group_size)
        tc = tc - tc.mean(dim=1, keepdim=True)  # (B, G)
        norm = (adv_sq * (tc * tc).sum(dim=1)).sqrt()  # (B,)
        corr = torch.where(norm > 0, (adv * tc).sum(dim=1) / norm.clamp_min(1e-300), torch.zeros_like(norm))
        out[name] = ((energy * corr).sum() / energy.sum()).item()
    return out


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 3e-4, eps_high: float = 4e-4, token_level: bool = False,
              num_sequences: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss = -(1 / N) * sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ), and metrics.

    logp, old_logp: (B, T) log-probs of the response tokens under pi_theta (with grad) and pi_old (treated as
    constant); advantages: (B,) A_i (constant); mask: (B, T) True on response tokens. Padding never enters: masked
    positions are replaced by 0 before any arithmetic, so they may hold anything, even inf/nan.
    - log s_i = masked mean over sequence i's own tokens of (logp - old_logp) (the 1/|y_i| of the formula).
    - Every sequence weighs the same whatever its length (a token-level mean would weight long answers more).
    - A response with no tokens contributes nothing and is not counted in N.
    - token_level=True is GSPO-token: log s_it = logp_t - sg(logp_t) + sg(log s_i), objective averaged over the
      tokens of each sequence; its value equals GSPO's, and with one advantage per sequence so does its gradient.
    - N = `num_sequences` if given, else the local count of non-empty sequences. Distributed / accumulated use:
      pass the all-reduced count of non-empty sequences in the whole optimizer step (all ranks, all
      micro-batches), so that the summed gradients equal one big batch's mean; gradients must then be *summed*
      over ranks (FSDP2 averages by default: multiply this loss by the world size, or reduce with SUM).
    Returns (loss: 0-dim tensor, metrics: dict of Python floats). Metrics over the non-empty sequences: clip
    fractions (low: s < 1 - eps_low with A < 0; high: s > 1 + eps_high with A > 0 — the cases where the clip binds
    and the gradient is 0), ratio mean/min/max, approx KL (the k3 estimator mean(exp(d) - 1 - d), d = logp - old_logp
    per token), advantage mean/std/min/max, and sequence / token / empty-sequence counts.
    """
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp, old_logp and mask must share a (B, T) shape; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be (B,) = ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    mask = mask.bool()
    # At least fp32: bf16 spaces values near 1 by 2^-7, wider than the whole clip band (eps ~ 4e-4), so a bf16
    # ratio would read 1 and never clip. The gradient flows back to a bf16 logp through the cast.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)
    adv = advantages.detach().to(dtype)  # (B,)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # where(), not multiplication by the mask: 0 * inf in padding would be nan.
    delta = torch.where(mask, logp - old_logp.detach(), zero)  # (B, T) log pi_theta - log pi_old, 0 on padding
    n_tok = mask.sum(dim=1)  # (B,) |y_i|
    nonempty = n_tok > 0  # (B,)
    log_s = delta.sum(dim=1) / n_tok.clamp(min=1).to(logp.dtype)  # (B,) log s_i; 0 for empty rows
    s = log_s.exp()  # (B,) s_i
    low, high = 1.0 - eps_low, 1.0 + eps_high

    if token_level:
        # s_it has the value of s_i, but its gradient flows through token t alone.
        logp_masked = torch.where(mask, logp, zero)  # (B, T)
        log_s_tok = logp_masked - logp_masked.detach() + log_s.detach().unsqueeze(1)  # (B, T)
        s_tok = log_s_tok.exp()  # (B, T)
        a = adv.unsqueeze(1)  # (B, 1)
        obj_tok = torch.minimum(s_tok * a, s_tok.clamp(low, high) * a)  # (B, T)
        obj = torch.where(mask, obj_tok, zero).sum(dim=1) / n_tok.clamp(min=1).to(logp.dtype)  # (B,)
    else:
        obj = torch.minimum(s * adv, s.clamp(low, high) * adv)  # (B,)

    count = int(nonempty.sum()) if num_sequences is None else num_sequences
    obj = torch.where(nonempty, obj, zero)  # (B,) empty responses contribute nothing
    loss = -obj.sum() / max(count, 1)

    metrics = _loss_metrics(s.detach(), delta.detach(), adv, mask, nonempty, low, high)
    metrics["num_sequences_norm"] = float(count)
    return loss, metrics


@torch.no_grad()
def _loss_metrics(s: torch.Tensor, delta: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                  nonempty: torch.Tensor, low: float, high: float) -> dict[str, float]:
    n_seq = nonempty.sum()
    if int(n_seq) == 0:
        return {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0,
                "approx_kl": 0.0, "adv_mean": 0.0, "adv_std": 0.0, "adv_min": 0.0, "adv_max": 0.0,
                "adv_sq_mean": 0.0, "num_sequences": 0.0, "num_tokens": 0.0, "empty_sequences": float(nonempty.numel())}
    s_ne, adv_ne = s[nonempty].double(), adv[nonempty].double()  # (S,) the non-empty sequences
    d = delta.double()[mask]  # (num_tokens,) per-token log-ratio
    stats = torch.stack([
        ((s_ne < low) & (adv_ne < 0)).double().mean(),
        ((s_ne > high) & (adv_ne > 0)).double().mean(),
        s_ne.mean(), s_ne.min(), s_ne.max(),
        (d.exp() - 1 - d).mean(),  # k3: an unbiased, non-negative estimate of KL(pi_old || pi_theta)
        adv_ne.mean(), adv_ne.std(correction=0), adv_ne.min(), adv_ne.max(), (adv_ne * adv_ne).mean(),
        n_seq.double(), mask.sum().double(), (~nonempty).sum().double(),
    ]).tolist()  # one device sync
    keys = ("clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_min", "ratio_max", "approx_kl",
            "adv_mean", "adv_std", "adv_min", "adv_max", "adv_sq_mean", "num_sequences", "num_tokens",
            "empty_sequences")
    return dict(zip(keys, stats))
