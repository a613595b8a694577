"""Triton kernels of SPEC §6, dispatched to by :mod:`tsmc_kernels.ops` (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``, which must be set before these modules are imported).

* :mod:`.twist_sample` — ``twist_sample_triton``: fused twist scoring + Gumbel-max sampling, one
  pass over the vocabulary (split across programs when there are few rows);
* :mod:`.topk` — ``topk_threshold_triton``: the per-row top-k threshold of the sampling kernel by
  radix select (2-4 passes, no host sync);
* :mod:`.weights` — ``normalize_triton``, ``resample_triton`` and the fused ``reweight_triton``
  (one launch for all prompts: normalise, ESS, log Zhat increment, decision, resampling with the
  SPEC §2 ancestor permutation);
* :mod:`.kv_gather` — ``kv_gather_triton_``: every tensor's rows ``a[i] != i`` in one launch
  through a cached pointer table.

Submodules are imported lazily by ops (importing one compiles nothing; kernels compile on first
launch). Shared pieces (the counter-based hash in ``tl.uint32``) live in :mod:`._common`.
"""
