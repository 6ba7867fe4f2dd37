"""Fused GPU kernels for pointwise attention, in Pallas on its Triton backend.

Computes the same as `zoo.attention.pointwise.pointwise_attention`:

    o_i = L_i^-alpha * sum_j h(q_i . k_j * scale) v_j

with three kernels and a `jax.custom_vjp`:

* forward, grid (query blocks, batch, heads): one query block stays in registers while a
  loop visits the key blocks, accumulating h(s) v in float32. There is no normalisation
  over keys, so no running max or sum: the accumulator is a plain sum, scaled by L^-alpha
  at the end.
* dq, grid (query blocks, batch, heads): recomputes s per key block;
  dq_i = sum_j h'(s_ij) (g_i . v_j) scale k_j, with g already multiplied by L_i^-alpha.
* dk/dv, grid (key blocks, batch, heads): loops over query blocks on transposed tiles
  s^T = k q^T; dv_j = sum_i h(s_ij) g_i and dk_j = sum_i h'(s_ij) (g_i . v_j) scale q_i.
  With `backward="atomic"` it also adds each tile's dq_i = ds k to a float32 dq with
  atomic adds, and the dq kernel is not run: 5 matmuls per tile pair instead of 7, at
  the price of a dq whose summation order varies from run to run. (Non-causal, program j
  starts its loop at query block j mod n and wraps around, so that programs running
  together add into different rows.)

Causal: only tiles with at least one visible (query, key) pair are visited, and only the
tiles that straddle the diagonal are masked elementwise. For query block i (queries
[i bq, (i + 1) bq)) the forward and dq loops run over key blocks [0, full) unmasked and
[full, end) masked, full = (i bq + 1) // bk (the key blocks whose last key is <= the
block's first query), end = ceil((i + 1) bq / bk) (those with a key <= its last query).
For key block j (keys [j bk, (j + 1) bk)) the dk/dv loop starts at query block
start = (j bk) // bq (the first with a query >= the block's first key), masks
[start, unmasked), unmasked = ceil(((j + 1) bk - 1) / bq), and runs [unmasked, n)
unmasked. Forward and dq programs run the heaviest query blocks (the last) first, so the
short ones fill the tail of the launch; dk/dv's heaviest are the first key blocks anyway.

Tiles and launch parameters (query and key tile, Triton warps and pipeline stages) are
set per kernel, per shape, by `kernel_config`: the nearest entry of the tuning table
(`pallas_tuning.TABLE`, or the JSON file named by `ZOO_PALLAS_TUNING`; measured by
`benchmarks/tune_pallas.py`) for the call's (length, head_dim, dtype, causal), else
`DEFAULT_CONFIG` (the fixed 128 x 64 tiles this kernel had before the table). `config=`
and the explicit `block_q` / `block_k` / `num_warps` / `num_stages` arguments override it.

h' comes from `jax.jvp` of the activation inside the kernel, so every activation of
`ACTIVATIONS` works without a hand-written derivative. Matmul operands stay in the input
dtype (bfloat16 tiles go to the tensor cores as bfloat16; h(s) and the score gradient are
cast to it, as flash-attention kernels do) and every matmul accumulates in float32. For
float32 inputs the dots follow `jax.default_matmul_precision` as XLA's do: TF32 on the
tensor cores by default, full float32 under "highest".

Lengths that are not a multiple of the tiles are zero-padded in the wrapper (queries to a
multiple of every query tile used, keys of every key tile). As in the blockwise path of
core.py, zero padding needs no mask: a zero value row adds nothing to any output, a zero
cotangent row (padded queries) adds nothing to dk or dv, and the padded rows of dq, dk,
dv are sliced off. head_dim is zero-padded to a power of two (>= 16), which leaves q.k
unchanged. Masks: a key-padding mask (`[..., 1, kv_len]`) is applied by zeroing the
hidden keys and values (their dk is then zero and their dv is zeroed by the `jnp.where`'s
own gradient), a query mask (`[..., q_len, 1]`) by zeroing the hidden queries' outputs; a
mask that varies along both axes raises ValueError.

Interpret mode (`interpret=True`) runs the same kernels in the Pallas interpreter on any
backend; the tests use it on the CPU. The API used (`pl.pallas_call`,
`pl.BlockSpec(block_shape, index_map)`, ref indexing with `pl.ds`, `plgpu.atomic_add`,
the Triton `CompilerParams`) is the same in jax 0.10 and 0.11; `CompilerParams` is looked
up under its older name `TritonCompilerParams` where the new one is missing. The Triton
compiler params are always passed: they are what selects the Triton backend over Mosaic
GPU, which jax picks by default for a `pallas_call` without them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.attention import masking
from zoo.attention.pointwise import pallas_tuning
from zoo.attention.pointwise.activations import ACTIVATIONS

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_MIN_BLOCK = 16  # Triton's dot wants every matmul dimension >= 16

KERNELS = ("fwd", "dq", "dkdv")
BACKWARDS = ("split", "atomic")
LAUNCH_KEYS = ("block_q", "block_k", "num_warps", "num_stages")
NUM_WARPS = (1, 2, 4, 8, 16)
# The parameters the kernel had before the tuning table: 128 x 64 tiles (dk/dv: 128 keys
# held, 64 queries a step), 2 pipeline stages, 4 warps up to head_dim 64 and 8 above
# (num_warps None here: `default_num_warps`).
DEFAULT_CONFIG = {
    "fwd": {"block_q": 128, "block_k": 64, "num_warps": None, "num_stages": 2},
    "dq": {"block_q": 128, "block_k": 64, "num_warps": None, "num_stages": 2},
    "dkdv": {"block_q": 64, "block_k": 128, "num_warps": None, "num_stages": 2},
    "backward": "split",
}
TUNING_ENV = "ZOO_PALLAS_TUNING"  # a JSON table to use instead of pallas_tuning.TABLE


def default_num_warps(head_dim: int) -> int:
  return 4 if head_dim <= 64 else 8


def _next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
  """The head_dim the kernels see (a power of two >= 16), which the table is keyed by."""
  return max(_MIN_BLOCK, _next_power_of_2(head_dim))


# ------------------------------------------------------------------------------ tuning table


def _is_power_of_2_block(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= _MIN_BLOCK and not x & (x - 1)


def check_launch(name: str, launch: Mapping[str, Any], *, partial: bool = False) -> None:
  """Raises ValueError unless `launch` holds valid tiles and Triton parameters (all four,
  or with `partial` any of them, None meaning "keep"; num_warps may be None anyway:
  `default_num_warps`)."""
  if not isinstance(launch, Mapping):
    raise ValueError(f"{name} must be a dict of {LAUNCH_KEYS}, got {launch!r}")
  unknown = set(launch) - set(LAUNCH_KEYS)
  missing = set() if partial else set(LAUNCH_KEYS) - set(launch)
  if unknown or missing:
    raise ValueError(f"{name} must have the keys {LAUNCH_KEYS}; unknown {sorted(unknown)}, "
                     f"missing {sorted(missing)}")
  for key in ("block_q", "block_k"):
    if key in launch and not (partial and launch[key] is None) \
        and not _is_power_of_2_block(launch[key]):
      raise ValueError(f"{name}.{key} must be a power of two >= {_MIN_BLOCK} (Triton "
                       f"tiles), got {launch[key]!r}")
  warps = launch.get("num_warps")
  if warps is not None and warps not in NUM_WARPS:
    raise ValueError(f"{name}.num_warps must be one of {NUM_WARPS} or None, got {warps!r}")
  stages = launch.get("num_stages")
  stages = 1 if stages is None and partial else stages
  if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
    raise ValueError(f"{name}.num_stages must be an int >= 1, got {stages!r}")


def check_config(config: Mapping[str, Any], *, partial: bool = False,
                 name: str = "config") -> None:
  """Raises ValueError unless `config` is {kernel: launch dict} for the KERNELS plus an
  optional "backward" (with `partial`, any subset, each launch partial too)."""
  if not isinstance(config, Mapping):
    raise ValueError(f"{name} must be a dict, got {config!r}")
  unknown = set(config) - set(KERNELS) - {"backward"}
  if unknown:
    raise ValueError(f"{name} has unknown keys {sorted(unknown)}; it takes {KERNELS} and "
                     f"'backward'")
  for kernel in KERNELS:
    if kernel in config:
      check_launch(f"{name}.{kernel}", config[kernel], partial=partial)
    elif not partial:
      raise ValueError(f"{name} lacks {kernel!r}")
  if config.get("backward", "split") not in BACKWARDS:
    raise ValueError(f"{name}.backward must be one of {BACKWARDS}, got {config['backward']!r}")


_ENTRY_KEYS = {"length": int, "head_dim": int, "dtype": str, "causal": bool}


def check_table(table: Mapping[str, Any]) -> None:
  """Raises ValueError naming what is wrong with a tuning table (see `pallas_tuning`)."""
  if not isinstance(table, Mapping) or not isinstance(table.get("entries"), list):
    raise ValueError("a pallas tuning table is a dict with a list 'entries'")
  if table.get("format", 1) != 1:
    raise ValueError(f"tuning table format {table.get('format')!r}; this code reads format 1")
  dtypes = {jnp.dtype(t).name for t in SUPPORTED_DTYPES}
  seen = set()
  for n, entry in enumerate(table["entries"]):
    where = f"tuning table entry {n}"
    if not isinstance(entry, Mapping):
      raise ValueError(f"{where} is not a dict")
    for key, kind in _ENTRY_KEYS.items():
      value = entry.get(key)
      if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
        raise ValueError(f"{where}: {key} must be a {kind.__name__}"
                         f"{' >= 1' if kind is int else ''}, got {value!r}")
    if entry["dtype"] not in dtypes:
      raise ValueError(f"{where}: dtype must be one of {sorted(dtypes)}, got {entry['dtype']!r}")
    if entry["head_dim"] != padded_head_dim(entry["head_dim"]):
      raise ValueError(f"{where}: head_dim must be a power of two >= {_MIN_BLOCK} (the "
                       f"padded head_dim), got {entry['head_dim']}")
    check_config({k: entry[k] for k in (*KERNELS, "backward") if k in entry}, name=where)
    key = tuple(entry[k] for k in _ENTRY_KEYS)
    if key in seen:
      raise ValueError(f"{where} repeats (length, head_dim, dtype, causal) = {key}")
    seen.add(key)


@functools.lru_cache(maxsize=8)
def _read_table(path: str, mtime: float) -> dict:
  del mtime  # part of the cache key only: an edited file is read again
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{TUNING_ENV}={path}: cannot read a JSON tuning table: {e}") from None
  check_table(table)
  return table


@functools.lru_cache(maxsize=1)
def _committed_table() -> dict:
  check_table(pallas_tuning.TABLE)
  return pallas_tuning.TABLE


def tuning_table() -> dict:
  """The table in use: the JSON file named by $ZOO_PALLAS_TUNING, else pallas_tuning.TABLE."""
  path = os.environ.get(TUNING_ENV)
  if path:
    try:
      mtime = os.path.getmtime(path)
    except OSError as e:
      raise ValueError(f"{TUNING_ENV}={path}: {e}") from None
    return _read_table(os.path.abspath(path), mtime)
  return _committed_table()


def _nearest_entry(table, length, head_dim, dtype_name, causal):
  same = [e for e in table["entries"] if e["head_dim"] == head_dim
          and e["dtype"] == dtype_name and e["causal"] == causal]
  if not same:
    return None
  target = math.log2(max(length, 1))
  return min(same, key=lambda e: (abs(math.log2(e["length"]) - target), -e["length"]))


def kernel_config(length: int, head_dim: int, dtype, causal: bool, *,
                  table: Mapping[str, Any] | None = None) -> dict:
  """The launch parameters for a call of this shape, before any override.

  Args:
    length: the longer of q_len and kv_len.
    head_dim: q's and k's head_dim (padded here to a power of two >= 16).
    dtype: the inputs' dtype.
    causal: the call's causal flag.
    table: a tuning table (None: `tuning_table()`).

  Returns:
    {"fwd", "dq", "dkdv": {block_q, block_k, num_warps, num_stages}, "backward",
     "source"}: the nearest entry (in log2 length) with the same padded head_dim, dtype
    and causal flag, or DEFAULT_CONFIG; "source" says which (and the entry's length).
  """
  table = tuning_table() if table is None else table
  d = padded_head_dim(head_dim)
  entry = _nearest_entry(table, length, d, jnp.dtype(dtype).name, bool(causal))
  base = DEFAULT_CONFIG if entry is None else entry
  out = {k: dict(base[k]) for k in KERNELS}
  out["backward"] = base.get("backward", "split")
  for launch in out.values():
    if isinstance(launch, dict) and launch["num_warps"] is None:
      launch["num_warps"] = default_num_warps(d)
  out["source"] = ("default (no tuned entry)" if entry is None else
                   f"tuning table entry length={entry['length']} head_dim={d} "
                   f"dtype={entry['dtype']} causal={entry['causal']}")
  return out


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict:
  """`base` (a full config) with the kernels' keys and "backward" of `override` replaced."""
  out = {k: dict(base[k]) for k in KERNELS}
  out["backward"] = base.get("backward", "split")
  for key, value in (override or {}).items():
    if key == "backward":
      out["backward"] = value
    elif key in KERNELS:
      out[key].update({k: v for k, v in value.items() if v is not None})
  return out


@dataclasses.dataclass(frozen=True)
class _Launch:
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernels are specialised on: a hashable static argument of the custom VJP."""
  activation: str
  scale: float
  causal: bool
  interpret: bool
  fwd: _Launch
  dq: _Launch
  dkdv: _Launch
  backward: str


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b (or with a and / or b transposed) with a float32 accumulator; operands must
  share a dtype."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _h_and_derivative(activation, s):
  h = ACTIVATIONS[activation]
  return jax.jvp(h, (s,), (jnp.ones_like(s),))


def _causal_keep(q_start, k_start, rows, cols, *, transposed=False):
  """Key position <= query position, for a (rows, cols) tile of s (or of s^T)."""
  if transposed:  # rows are keys, columns queries
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  else:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  return k_pos <= q_pos


def causal_key_block_range(i, block_q, block_k, num_k_blocks):
  """Causal, query block i: key blocks [0, full) are wholly visible, [full, end) partly,
  [end, num_k_blocks) not at all (see the module docstring). Works on ints and traced
  int32 scalars alike."""
  q_start = i * block_q
  full = jnp.minimum(lax.div(q_start + 1, block_k), num_k_blocks)
  end = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), num_k_blocks)
  return full, jnp.maximum(end, full)


def causal_query_block_range(j, block_q, block_k, num_q_blocks):
  """Causal, key block j: query blocks [0, start) see none of it, [start, unmasked) part,
  [unmasked, num_q_blocks) all of it."""
  k_start = j * block_k
  start = jnp.minimum(lax.div(k_start, block_q), num_q_blocks)
  unmasked = lax.div(k_start + block_k - 1 + block_q - 1, block_q)
  return start, jnp.clip(unmasked, start, num_q_blocks)


def _over_key_blocks(step, carry, i, *, block_q, block_k, num_k_blocks, causal):
  """carry = step(key offset, carry, masked) over the key blocks query block i sees: those
  wholly visible unmasked, then (causal) those straddling the diagonal masked."""
  def body(masked):
    return lambda j, c: step(pl.multiple_of(j * block_k, block_k), c, masked)
  if not causal:
    return lax.fori_loop(0, num_k_blocks, body(False), carry)
  full, end = causal_key_block_range(i, block_q, block_k, num_k_blocks)
  carry = lax.fori_loop(0, full, body(False), carry)
  return lax.fori_loop(full, end, body(True), carry)


def _this_block(num_blocks, reverse):
  """This program's block along grid axis 0; the last first with `reverse`."""
  n = pl.program_id(0)
  return num_blocks - 1 - n if reverse else n


# --------------------------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, ls_ref, o_ref, *, activation, scale, causal,
                    block_q, block_k, num_q_blocks, num_k_blocks):
  i = _this_block(num_q_blocks, causal)
  q = q_ref[...]
  h = ACTIVATIONS[activation]

  def step(start, acc, masked):
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    w = h(_dot(q, k, trans_b=True) * scale)
    if masked:
      w = jnp.where(_causal_keep(i * block_q, start, block_q, block_k), w, 0.0)
    return acc + _dot(w.astype(v.dtype), v)

  acc = _over_key_blocks(step, jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32), i,
                         block_q=block_q, block_k=block_k, num_k_blocks=num_k_blocks,
                         causal=causal)
  o_ref[...] = (acc * ls_ref[...][:, None]).astype(o_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, ls_ref, g_ref, dq_ref, *, activation, scale, causal,
               block_q, block_k, num_q_blocks, num_k_blocks):
  i = _this_block(num_q_blocks, causal)
  q = q_ref[...]
  # dL/d(sum_j h(s_ij) v_j) = g_i * L_i^-alpha, in the matmul dtype
  g = (g_ref[...].astype(jnp.float32) * ls_ref[...][:, None]).astype(v_ref.dtype)

  def step(start, dq, masked):
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    _, dh = _h_and_derivative(activation, _dot(q, k, trans_b=True) * scale)
    ds = _dot(g, v, trans_b=True) * dh * scale
    if masked:
      ds = jnp.where(_causal_keep(i * block_q, start, block_q, block_k), ds, 0.0)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _over_key_blocks(step, jnp.zeros((block_q, dq_ref.shape[-1]), jnp.float32), i,
                        block_q=block_q, block_k=block_k, num_k_blocks=num_k_blocks,
                        causal=causal)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, ls_ref, g_ref, *refs, activation, scale, causal,
                 block_q, block_k, num_q_blocks, atomic_dq):
  # This program holds key block j (block_k keys) and loops over query blocks of block_q.
  # With atomic_dq, refs = (zeroed dq input, dk, dv, dq accumulator aliasing that input).
  if atomic_dq:
    _, dk_ref, dv_ref, dq_ref = refs
  else:
    dk_ref, dv_ref = refs
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]

  def body(n, carry, masked):
    dk, dv = carry
    # Non-causal atomic: program j starts at query block j (mod n) so that programs
    # running side by side add into different dq rows.
    i = lax.rem(n + j, num_q_blocks) if atomic_dq and not causal else n
    start = pl.multiple_of(i * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]
    ls = ls_ref[pl.ds(start, block_q)]
    g = (g_ref[pl.ds(start, block_q), :].astype(jnp.float32) * ls[:, None]).astype(v.dtype)
    ht, dht = _h_and_derivative(activation, _dot(k, q, trans_b=True) * scale)  # [bk, bq]
    dst = _dot(v, g, trans_b=True) * dht * scale
    if masked:
      keep = _causal_keep(start, j * block_k, block_k, block_q, transposed=True)
      ht, dst = jnp.where(keep, ht, 0.0), jnp.where(keep, dst, 0.0)
    dst = dst.astype(q.dtype)
    dv = dv + _dot(ht.astype(g.dtype), g)
    dk = dk + _dot(dst, q)
    if atomic_dq:
      plgpu.atomic_add(dq_ref, (pl.ds(start, block_q), slice(None)),
                       _dot(dst, k, trans_a=True))
    return dk, dv

  carry = (jnp.zeros((block_k, dk_ref.shape[-1]), jnp.float32),
           jnp.zeros((block_k, dv_ref.shape[-1]), jnp.float32))
  if causal:
    start, unmasked = causal_query_block_range(j, block_q, block_k, num_q_blocks)
    carry = lax.fori_loop(start, unmasked, functools.partial(body, masked=True), carry)
  else:
    unmasked = 0
  dk, dv = lax.fori_loop(unmasked, num_q_blocks, functools.partial(body, masked=False),
                         carry)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas_calls


def _blocked(block, length, dim, *, reverse=False):
  """BlockSpec of a `[B, L, H, D]` array: `block` rows (or all `length`) of one (b, h);
  with `reverse`, grid step n takes the n-th block from the end."""
  if block is None:
    return pl.BlockSpec((None, length, None, dim), lambda n, b, h: (b, 0, h, 0))
  if reverse:
    last = length // block - 1
    return pl.BlockSpec((None, block, None, dim), lambda n, b, h: (b, last - n, h, 0))
  return pl.BlockSpec((None, block, None, dim), lambda n, b, h: (b, n, h, 0))


def _scale_spec(block, length, *, reverse=False):
  """BlockSpec of the `[B, H, Lq]` length scale."""
  if block is None:
    return pl.BlockSpec((None, None, length), lambda n, b, h: (b, h, 0))
  if reverse:
    last = length // block - 1
    return pl.BlockSpec((None, None, block), lambda n, b, h: (b, h, last - n))
  return pl.BlockSpec((None, None, block), lambda n, b, h: (b, h, n))


def _params(launch: _Launch):
  return _CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _forward_call(q, k, v, ls, cfg: _Static):
  b, lq, heads, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  bq, bk = cfg.fwd.block_q, cfg.fwd.block_k
  rev = cfg.causal
  kernel = functools.partial(
      _forward_kernel, activation=cfg.activation, scale=cfg.scale, causal=cfg.causal,
      block_q=bq, block_k=bk, num_q_blocks=lq // bq, num_k_blocks=lk // bk)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, lq, heads, dv), q.dtype),
      grid=(lq // bq, b, heads),
      in_specs=[_blocked(bq, lq, d, reverse=rev), _blocked(None, lk, d),
                _blocked(None, lk, dv), _scale_spec(bq, lq, reverse=rev)],
      out_specs=_blocked(bq, lq, dv, reverse=rev),
      compiler_params=_params(cfg.fwd), interpret=cfg.interpret,
      name="pointwise_attention_fwd")(q, k, v, ls)


def _dq_call(q, k, v, ls, g, cfg: _Static):
  b, lq, heads, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  bq, bk = cfg.dq.block_q, cfg.dq.block_k
  rev = cfg.causal
  return pl.pallas_call(
      functools.partial(_dq_kernel, activation=cfg.activation, scale=cfg.scale,
                        causal=cfg.causal, block_q=bq, block_k=bk, num_q_blocks=lq // bq,
                        num_k_blocks=lk // bk),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(lq // bq, b, heads),
      in_specs=[_blocked(bq, lq, d, reverse=rev), _blocked(None, lk, d),
                _blocked(None, lk, dv), _scale_spec(bq, lq, reverse=rev),
                _blocked(bq, lq, dv, reverse=rev)],
      out_specs=_blocked(bq, lq, d, reverse=rev),
      compiler_params=_params(cfg.dq), interpret=cfg.interpret,
      name="pointwise_attention_dq")(q, k, v, ls, g)


def _dkdv_call(q, k, v, ls, g, cfg: _Static):
  """(dk, dv), or with backward="atomic" (dq, dk, dv)."""
  b, lq, heads, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  bq, bk = cfg.dkdv.block_q, cfg.dkdv.block_k
  atomic = cfg.backward == "atomic"
  in_specs = [_blocked(None, lq, d), _blocked(bk, lk, d), _blocked(bk, lk, dv),
              _scale_spec(None, lq), _blocked(None, lq, dv)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [_blocked(bk, lk, d), _blocked(bk, lk, dv)]
  args = [q, k, v, ls, g]
  aliases = {}
  if atomic:
    in_specs.append(_blocked(None, lq, d))
    out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out_specs.append(_blocked(None, lq, d))
    args.append(jnp.zeros(q.shape, jnp.float32))
    aliases = {len(args) - 1: 2}
  outs = pl.pallas_call(
      functools.partial(_dkdv_kernel, activation=cfg.activation, scale=cfg.scale,
                        causal=cfg.causal, block_q=bq, block_k=bk, num_q_blocks=lq // bq,
                        atomic_dq=atomic),
      out_shape=out_shape, grid=(lk // bk, b, heads), in_specs=in_specs,
      out_specs=out_specs, input_output_aliases=aliases,
      compiler_params=_params(cfg.dkdv), interpret=cfg.interpret,
      name="pointwise_attention_dkdv")(*args)
  if atomic:
    dk, dv_, dq = outs
    return dq.astype(q.dtype), dk, dv_
  return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(q, k, v, ls, cfg):
  return _forward_call(q, k, v, ls, cfg)


def _fused_fwd(q, k, v, ls, cfg):
  return _forward_call(q, k, v, ls, cfg), (q, k, v, ls)


def _fused_bwd(cfg, residuals, g):
  q, k, v, ls = residuals
  if cfg.backward == "atomic":
    dq, dk, dv = _dkdv_call(q, k, v, ls, g, cfg)
  else:
    dq = _dq_call(q, k, v, ls, g, cfg)
    dk, dv = _dkdv_call(q, k, v, ls, g, cfg)
  return dq, dk, dv, jnp.zeros_like(ls)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------------- wrapper


def _on_gpu() -> bool:
  return jax.default_backend() in GPU_PLATFORMS


def _pad_to(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _split_mask(mask, q, k):
  """(keys kept `[B', kv_len, H', 1]` or None, queries kept `[B', q_len, H', 1]` or None)."""
  mask = masking.check_mask(mask, q, k)
  key_keep, query_keep, general = masking.split_mask(mask, q.shape[1], k.shape[1])
  if general is not None:
    raise ValueError(
        f"the pallas pointwise kernel takes key-padding masks [..., 1, kv_len] and query "
        f"masks [..., q_len, 1]; this mask {mask.shape} varies along both axes: use the "
        f"dense or blockwise path (implementation=None)")
  return key_keep, query_keep


def resolve_config(q_len: int, kv_len: int, head_dim: int, dtype, causal: bool, *,
                   config: Mapping[str, Any] | None = None, block_q: int | None = None,
                   block_k: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None) -> dict:
  """The launch parameters a call runs with: `kernel_config` for its shape, then
  `config` (partial per-kernel overrides and/or "backward"), then the explicit
  arguments, then every tile lowered to its axis' length rounded up to a power of two
  (>= 16). Returns a full config plus "source" (see `kernel_config`)."""
  if config is not None:
    check_config(config, partial=True)
  legacy = {"block_q": block_q, "block_k": block_k, "num_warps": num_warps,
            "num_stages": num_stages}
  check_launch("argument", {k: v for k, v in legacy.items() if v is not None}, partial=True)
  base = kernel_config(max(q_len, kv_len), head_dim, dtype, causal)
  out = merge_config(base, config)
  # block_q / block_k are the held and looped tiles of every kernel: forward and dq hold
  # block_q queries and loop over block_k keys, dk/dv holds block_q keys and loops over
  # block_k queries (the meaning they had before the per-kernel table).
  out = merge_config(out, {
      "fwd": {"block_q": block_q, "block_k": block_k},
      "dq": {"block_q": block_q, "block_k": block_k},
      "dkdv": {"block_q": block_k, "block_k": block_q}})
  out = merge_config(out, {kernel: {"num_warps": num_warps, "num_stages": num_stages}
                           for kernel in KERNELS})
  cap_q = max(_MIN_BLOCK, _next_power_of_2(q_len))
  cap_k = max(_MIN_BLOCK, _next_power_of_2(kv_len))
  for kernel in KERNELS:
    launch = out[kernel]
    launch["block_q"] = min(launch["block_q"], cap_q)
    launch["block_k"] = min(launch["block_k"], cap_k)
    if launch["num_warps"] is None:
      launch["num_warps"] = default_num_warps(padded_head_dim(head_dim))
  out["source"] = base["source"] + (" with overrides" if config or any(
      v is not None for v in legacy.values()) else "")
  return out


def pointwise_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array,
                               length_scale: jax.Array | None = None, *,
                               activation: str = "relu", scale: float | None = None,
                               causal: bool = False, mask: jax.Array | None = None,
                               block_q: int | None = None, block_k: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               config: Mapping[str, Any] | None = None,
                               interpret: bool = False) -> jax.Array:
  """o_i = length_scale_i * sum_j h(q_i . k_j * scale) v_j, fused (Pallas, Triton backend).

  Args:
    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, heads, head_dim(_v)]`;
      float32, bfloat16 or float16 (one dtype; accumulation is float32).
    length_scale: L^-alpha per query, broadcastable to `[batch, heads, q_len, 1]` (as
      `core.length_scale` makes it); None for 1. Not differentiated.
    activation: a key of `pointwise.ACTIVATIONS`.
    scale: the score scale; None for 1/sqrt(head_dim).
    causal: query i sees keys j <= i (positions aligned at the start).
    mask: None, a key-padding mask broadcastable to `[batch, heads, 1, kv_len]`, or a query
      mask broadcastable to `[batch, heads, q_len, 1]` (True = attend). Other masks raise
      ValueError. The length scale is not derived from it: pass the matching one.
    block_q, block_k: None (the tuning table's, see `kernel_config`) or tile sizes,
      powers of two >= 16, for every kernel: the forward and dq kernels hold block_q
      queries and loop over block_k keys; the dk/dv kernel holds block_q keys and loops
      over block_k queries. Lowered to the lengths when those are shorter.
    num_warps, num_stages: None (the table's) or the Triton warps per program and
      software-pipelining stages of every kernel.
    config: per-kernel overrides, e.g. {"dkdv": {"block_k": 128, "num_stages": 3},
      "backward": "atomic"} (keys as in `pallas_tuning`); the explicit arguments above win
      over it.
    interpret: run in the Pallas interpreter (any backend; slow; for tests).

  Returns:
    `[batch, q_len, heads, head_dim_v]` in q's dtype.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
  masking.check_qkv(q, k, v)
  dtype = jnp.result_type(q, k, v)
  if dtype not in [jnp.dtype(t) for t in SUPPORTED_DTYPES]:
    raise ValueError(f"the pallas pointwise kernel takes float32, bfloat16 or float16 "
                     f"inputs, got {dtype}")
  b, q_len, heads, d = q.shape
  kv_len, dv = k.shape[1], v.shape[-1]
  d_pad, dv_pad = padded_head_dim(d), padded_head_dim(dv)
  launch = resolve_config(q_len, kv_len, max(d, dv), dtype, causal, config=config,
                          block_q=block_q, block_k=block_k, num_warps=num_warps,
                          num_stages=num_stages)
  if not interpret and not _on_gpu():
    raise ValueError(
        f"the pallas pointwise kernel runs on GPUs (Pallas' Triton backend); JAX's "
        f"backend here is {jax.default_backend()!r}. Use interpret=True "
        f"(implementation='pallas_interpret') to run it in the Pallas interpreter.")
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  out_dtype = q.dtype
  if q_len == 0 or kv_len == 0:  # a query that sees no key outputs 0
    return jnp.zeros((b, q_len, heads, dv), out_dtype)

  key_keep, query_keep = _split_mask(mask, q, k)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  if key_keep is not None:
    k = jnp.where(key_keep, k, jnp.zeros((), dtype))
    v = jnp.where(key_keep, v, jnp.zeros((), dtype))

  # Each axis is cut in tiles of every kernel that runs: the lengths are padded to a
  # multiple of the largest (all powers of two).
  used = ("fwd", "dkdv") if launch["backward"] == "atomic" else KERNELS
  q_pad = -(-q_len // max(launch[n]["block_q"] for n in used)) * max(
      launch[n]["block_q"] for n in used)
  kv_pad = -(-kv_len // max(launch[n]["block_k"] for n in used)) * max(
      launch[n]["block_k"] for n in used)
  qp = _pad_to(_pad_to(q, 1, q_pad), 3, d_pad)
  kp = _pad_to(_pad_to(k, 1, kv_pad), 3, d_pad)
  vp = _pad_to(_pad_to(v, 1, kv_pad), 3, dv_pad)
  if length_scale is None:
    ls = jnp.ones((b, heads, q_len), jnp.float32)
  else:
    ls = jnp.asarray(length_scale, jnp.float32)
    ls = ls.reshape((1,) * (4 - ls.ndim) + ls.shape)
    ls = jnp.broadcast_to(ls, (b, heads, q_len, 1))[..., 0]
  ls = _pad_to(lax.stop_gradient(ls), 2, q_pad)

  static = _Static(activation=activation, scale=float(scale), causal=bool(causal),
                   interpret=bool(interpret),
                   backward=launch["backward"],
                   **{n: _Launch(**{key: launch[n][key] for key in LAUNCH_KEYS})
                      for n in KERNELS})
  out = _fused(qp, kp, vp, ls, static)[:, :q_len, :, :dv]
  if query_keep is not None:
    out = jnp.where(query_keep, out, jnp.zeros((), out.dtype))
  return out.astype(out_dtype)
