"""Launch parameters of the fused Pallas pointwise-attention kernels, per shape.

`pallas.kernel_config` looks a call up here by (length, head_dim, dtype, causal): among
the entries of the same head_dim (after padding to a power of two >= 16), dtype and
causal flag it takes the one whose `length` is nearest in log2 (ties: the longer), and
falls back to `pallas.DEFAULT_CONFIG` (128 x 64 tiles) when none has them. Each entry
gives, per kernel, the tiles and Triton launch parameters:

* `fwd` and `dq`: `block_q` queries held per program, `block_k` keys per loop step;
* `dkdv`: `block_k` keys held per program, `block_q` queries per loop step;
* `num_warps`, `num_stages` of each;
* `backward`: "split" (a dq kernel and a dk/dv kernel, deterministic) or "atomic" (one
  kernel that also adds dq with float32 atomics: 5 matmuls a tile pair instead of 7;
  dq's summation order then varies from run to run).

`benchmarks/tune_pallas.py` measures the table on a GPU and writes it as JSON (with the
GPU, the jax version and the timings); `python benchmarks/tune_pallas.py --install
TABLE.json` rewrites this file from such a JSON. The environment variable
`ZOO_PALLAS_TUNING=/path/table.json` makes the kernel read that JSON instead of `TABLE`.

`TABLE["measured_on"]` names the GPU that measured the table (None: no GPU has; then it
has no entries and every shape runs the defaults), `TABLE["source"]` how it was made.
"""

TABLE = {
    "format": 1,
    "source": "untuned defaults: no GPU has measured this table; every shape uses "
              "pallas.DEFAULT_CONFIG (128 x 64 tiles)",
    "measured_on": None,
    "jax_version": None,
    "date": None,
    "entries": [],
}
