"""The fast loop's switches: the reference K/V cache, torch.compile, the captured
plans, fused projections and the folded attention bias."""

from __future__ import annotations

from contextlib import AbstractContextManager

from ..errors import MagicFaceInputError
from ..kv_cache import ReferenceKVCache


class FastLoopSwitchesMixin:
    """`MagicFacePipeline`'s switches; they act on its `fast_sampler` and `kv_cache`."""

    def enable_kv_cache(self, device_bytes: int = 4 << 30,
                        host_bytes: int = 16 << 30) -> ReferenceKVCache:
        """Cache reference K/V by content hash: a repeated reference skips its
        reference-path rows. Budgets in bytes (GPU tier, then host spill)."""
        self.kv_cache = ReferenceKVCache(device_bytes=device_bytes, host_bytes=host_bytes)
        return self.kv_cache

    def enable_auto_masks(self, detector: str | None = None, sam_checkpoint: str | None = None,
                          sam_model_type: str = "vit_b", faces: bool = True,
                          threshold: float = 0.3):
        """Masks from the concept word: a concept with `mask="auto"`, or with no mask,
        gets the proposal of `auto_masks.MaskProposer` (a Grounding DINO `detector`,
        MTCNN for person words with `faces`, SAM to outline the box). Returns it; set
        `mask_proposer` to use one made elsewhere (or None to turn it off)."""
        from ..auto_masks import MaskProposer

        self.mask_proposer = MaskProposer.from_settings(
            detector=detector, sam_checkpoint=sam_checkpoint, sam_model_type=sam_model_type,
            faces=faces, device=str(self.device), threshold=threshold)
        return self.mask_proposer

    def enable_compile(self, mode: str = "default", options: dict | None = None) -> None:
        """torch.compile the UNet for the fast path (falls back to eager when the compiler
        fails). `options` (inductor config, e.g. `{"conv_1x1_as_mm": True}`) replaces
        `mode`."""
        self.fast_sampler.enable_compile(mode, options)

    def disable_compile(self) -> None:
        self.fast_sampler.disable_compile()

    @property
    def is_compiled(self) -> bool:
        return self.fast_sampler.is_compiled

    def clear_plans(self) -> None:
        """Drop the fast loop's buffers and captured graphs (they rebuild on use)."""
        self.fast_sampler.clear_plans()

    def sync_check(self) -> AbstractContextManager[None]:
        """A context manager: inside it, a host-device sync in the fast loop's steps is
        an error (CUDA only)."""
        return self.fast_sampler.sync_check()

    def fuse_qkv_projections(self) -> None:
        """One matmul for each self-attention's Q, K, V and each cross-attention's K, V
        (diffusers' fused projections; same maths, fewer kernels). Both loops and every
        processor of this library use the fused weights once set."""
        self.unet.fuse_qkv_projections()
        self.clear_plans()

    @property
    def fold_attention_bias(self) -> bool:
        """Fast path: carry RSA/RBA's bias in extra head dims so SDPA runs without a
        mask (flash-eligible, no dense (Lq x Lk) bias). Same output up to the rounding
        of w*sqrt(d) to the model dtype. On by default (measured faster on an H100)."""
        return self.fast_sampler.fold_bias

    @fold_attention_bias.setter
    def fold_attention_bias(self, enabled: bool) -> None:
        self.fast_sampler.fold_bias = bool(enabled)

    @property
    def fold_min_tokens(self) -> int:
        """With `fold_attention_bias`: fold only levels of at least this many query
        tokens (h*w); coarser levels keep the dense bias. 0 folds every level."""
        return self.fast_sampler.fold_min_tokens

    @fold_min_tokens.setter
    def fold_min_tokens(self, tokens: int) -> None:
        if int(tokens) < 0:
            raise MagicFaceInputError(f"fold_min_tokens must be >= 0, got {tokens}")
        self.fast_sampler.fold_min_tokens = int(tokens)
