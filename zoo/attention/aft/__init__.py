"""Attention Free Transformer (AFT), Zhai et al. 2021 (arXiv 2105.14103).

No dot products between queries and keys: each key is combined with a learned position
bias, the values are averaged feature by feature with those weights, and the query gates
the result. With Q, K, V `[T, d]` the projected inputs and sigma the logistic sigmoid:

* AFT-full (Eq. 2), `aft_full`, w `[T, T]` learned (`full_local.py`):
      Y_t = sigma(Q_t) * sum_t' exp(K_t' + w_t,t') * V_t' / sum_t' exp(K_t' + w_t,t')
* AFT-local (Eq. 4), `aft_local`: Eq. 2 with w_t,t' kept where |t - t'| < s (`window`)
  and 0, not -inf, elsewhere (`full_local.py`).
* AFT-simple (Eq. 5), `aft_simple`: w = 0, so the key sums are shared by all queries,
  linear in T (`simple.py`).
* AFT-conv (Eq. 6), `aft_conv`: per head, a depthwise s (x s) filter as the position bias,
  reparameterised by Eq. 8 (`aft_conv_kernel`) so that it starts as per-head AFT-simple
  (`conv.py`).
* Parameterisation (Sec. 3.3): w = u v^T (Eq. 7) for full and local.

Every core is exact at any scale of q, k and w (shifted sums in log space, with an exact
fallback; `zoo.attention.logspace`), takes `[batch, length, dim]` arrays and a key padding
mask, and computes in float32 at least. `parallel.py` splits each variant along the
sequence; `modules.py` holds the layers (`AFTFull`, `AFTLocal`, `AFTSimple`, `AFTConv`),
their options and FLOPs formulas, and registers them.
"""

from zoo.attention.aft import common, conv, full_local, modules, parallel, simple
from zoo.attention.aft.common import key_padding_mask
from zoo.attention.aft.conv import (aft_conv, aft_conv_kernel, band_offsets, band_taps,
                                    band_triple, conv_attention, conv_tap_index, far_triples)
from zoo.attention.aft.full_local import (aft_full, aft_local, full_attention, local_attention,
                                          local_bias)
from zoo.attention.aft.modules import (CONV_CORE, FULL_CORE, LOCAL_CORE, SIMPLE_CORE, AFTConv,
                                       AFTConvOptions, AFTFull, AFTFullOptions, AFTLayer,
                                       AFTLocal, AFTLocalOptions, AFTOptions, AFTSimple)
from zoo.attention.aft.simple import aft_simple, simple_attention
from zoo.attention.logspace import prefix_sum

__all__ = ["AFTConv", "AFTConvOptions", "AFTFull", "AFTFullOptions", "AFTLayer", "AFTLocal",
           "AFTLocalOptions", "AFTOptions", "AFTSimple", "CONV_CORE", "FULL_CORE",
           "LOCAL_CORE", "SIMPLE_CORE", "aft_conv", "aft_conv_kernel", "aft_full",
           "aft_local", "aft_simple", "band_offsets", "band_taps", "band_triple", "common",
           "conv", "conv_attention", "conv_tap_index", "far_triples", "full_attention",
           "full_local", "key_padding_mask", "local_attention", "local_bias", "modules",
           "parallel", "prefix_sum", "simple", "simple_attention"]
