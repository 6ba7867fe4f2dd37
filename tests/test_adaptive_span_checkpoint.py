"""`zoo.checkpoints.adaptive_span`: the adaptive-span authors' checkpoints into TransformerSeq.

* The toy checkpoint written by the authors' own `save_checkpoint` (torch zip, `module.`
  keys), read without torch and unwrapped, loads into exactly the parameters that
  `load_authors_state_dict` gives from the npz of the same weights; same outputs.
* Their vocabulary: `authors_vocabulary` of a train.txt written by their prep scripts'
  own expressions (enwik8's decimal bytes, text8's characters) equals
  `vocabulary_from_raw` of the raw bytes; the byte permutation; a 256-id byte model
  loaded through the permutation gives, on the raw bytes, the log-probabilities the
  authors' model gives on their ids, and ~0 probability to bytes they never saw.
* Errors: no state dict, a vocabulary that does not fit, tokens without a byte.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.checkpoints import adaptive_span as adaspan
from zoo.checkpoints.files import CheckpointError
from zoo.checkpoints.torch_pickle import read_torch
from zoo.models.transformer_seq import TransformerSeq, load_authors_state_dict

from tests.helpers import fixture_path

TOY = "pretrained/adaspan_toy.pt"
TOY_NPZ = "pretrained/adaspan_toy_model_state_dict.npz"
TOY_VOCAB = 12

_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def _model(vocab_size: int = TOY_VOCAB, seed: int = 0) -> TransformerSeq:
  """The toy's shapes: 2 layers x 16, 2 heads, max span 8, ff 32, adaptive span."""
  return TransformerSeq(vocab_size=vocab_size, width=16, num_heads=2, depth=2, max_span=8,
                        inner_size=32, attention="adaptive_span",
                        attention_options=dict(ramp=4, span_init=0.5), rngs=nnx.Rngs(seed))


def _params(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def _toy_checkpoint():
  return read_torch(fixture_path(TOY), use_torch=False)


# ----------------------------------------------------------------------------------------
# The toy checkpoint.


def test_unwrap():
  ckpt = _toy_checkpoint()
  state = adaspan.unwrap(ckpt)
  with np.load(fixture_path(TOY_NPZ)) as f:
    assert sorted(state) == sorted(k.removeprefix("module.") for k in f.files)
  assert adaspan.unwrap(state).keys() == state.keys()  # a plain state dict as it is
  slashed = {k.replace(".", "/"): v for k, v in ckpt["model"].items()}
  assert sorted(adaspan.unwrap(slashed)) == sorted(k.replace(".", "/") for k in state)
  with pytest.raises(CheckpointError, match="no state dict"):
    adaspan.unwrap({"iter_no": 3, "logger": {"step": [1]}})
  with pytest.raises(CheckpointError, match="both"):
    adaspan.unwrap({"module.key_pe": np.zeros(1), "key_pe": np.zeros(1)})


def test_loads_the_authors_toy_checkpoint():
  model = _model()
  report = adaspan.load(model, _toy_checkpoint())
  reference = _model(seed=1)
  with np.load(fixture_path(TOY_NPZ)) as f:
    load_authors_state_dict(reference, {k.removeprefix("module."): f[k] for k in f.files})
  got, want = _params(model), _params(reference)
  assert sorted(report["loaded"]) == sorted(got) and report["kept"] == {}
  assert set(report["ignored"]) == {"iter_no", "optimizer", "logger", "scheduler_iter"}
  assert report["vocabulary"] is None
  for name in want:
    assert got[name].tobytes() == want[name].tobytes(), name
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, TOY_VOCAB, (2, 9)), jnp.int32)
  model.eval()
  reference.eval()
  np.testing.assert_array_equal(np.asarray(_forward(model, tokens)),
                                np.asarray(_forward(reference, tokens)))
  # From the path too, and into an abstract model.
  abstract = nnx.eval_shape(_model)
  report = adaspan.load(abstract, str(fixture_path(TOY)))
  assert len(report["loaded"]) == len(want)


def test_load_errors():
  ckpt = _toy_checkpoint()
  with pytest.raises(CheckpointError, match="vocabulary="):
    adaspan.load(_model(256), ckpt)  # 12 ids into 256 without a vocabulary
  with pytest.raises(CheckpointError, match="12 rows"):
    adaspan.load(_model(256), ckpt, vocabulary=["a", "b"])
  bad = dict(ckpt["model"])
  del bad["module.key_pe"]
  with pytest.raises(CheckpointError, match="key_pe"):
    adaspan.load(_model(), {"model": bad})
  report = adaspan.load(_model(), {"model": bad}, strict=False)
  assert report["kept"] == {"key_pe": "not in the checkpoint"}


# ----------------------------------------------------------------------------------------
# The authors' vocabulary.

# The prep scripts' own expressions (salesforce/awd-lstm-lm data/enwik8/prep_enwik8.py,
# kimiyoung/transformer-xl prep_text8.py) that write train.txt.


def _prep_enwik8(part: bytes) -> str:
  return " ".join([str(c) if c != ord("\n") else "\n" for c in part])


def _prep_text8(part: str) -> str:
  return " ".join(["_" if c == " " else c for c in part.strip()])


ENWIK8_RAW = b"<a>x\nbb  a\n\nx<y>\n"  # 8 distinct bytes and the newline
TEXT8_RAW = " the cat ate the hat "  # text8: lower case and spaces, no newline


def test_authors_vocabulary_from_train_txt_and_raw(tmp_path):
  path = tmp_path / "train.txt"
  path.write_text(_prep_enwik8(ENWIK8_RAW), encoding="utf8")
  vocab = adaspan.authors_vocabulary(path)
  assert vocab == ["60", "97", "62", "120", "<eos>", "98", "32", "121"]
  assert adaspan.vocabulary_from_raw(ENWIK8_RAW, "enwik8") == vocab
  assert adaspan.detect_scheme(vocab) == "enwik8"
  no_newline = b"ab"
  path.write_text(_prep_enwik8(no_newline), encoding="utf8")
  assert adaspan.authors_vocabulary(path) == ["97", "98", "<eos>"]
  assert adaspan.vocabulary_from_raw(no_newline, "enwik8") == ["97", "98", "<eos>"]

  path.write_text(_prep_text8(TEXT8_RAW), encoding="utf8")
  vocab = adaspan.authors_vocabulary(path)
  assert vocab == ["t", "h", "e", "_", "c", "a", "<eos>"]
  assert adaspan.vocabulary_from_raw(TEXT8_RAW.encode(), "text8") == vocab
  assert adaspan.detect_scheme(vocab) == "text8"
  text = "a b\nc\td  e\r\nf "
  path.write_text(_prep_text8(text), encoding="utf8")
  assert adaspan.authors_vocabulary(path) == adaspan.vocabulary_from_raw(text.encode(), "text8")

  path.write_text("b a\na c\nc c c\n", encoding="utf8")  # their --adapt-io sort_dict
  assert adaspan.authors_vocabulary(path, sort_dict=True) == ["c", "<eos>", "a", "b"]


def test_byte_permutation():
  perm = adaspan.byte_permutation(["60", "<eos>", "32"])
  assert perm.shape == (256,) and perm.dtype == np.int64
  assert (perm[60], perm[10], perm[32]) == (0, 1, 2)
  assert (np.delete(perm, [60, 10, 32]) == -1).all()
  perm = adaspan.byte_permutation(["a", "_", "<eos>"], scheme="text8")
  assert (perm[97], perm[32], perm[10]) == (0, 1, 2)
  assert adaspan.token_bytes(["1", "<eos>"], "text8").tolist() == [49, 10]
  assert adaspan.token_bytes(["1", "<eos>"]).tolist() == [1, 10]  # digits read as enwik8
  with pytest.raises(CheckpointError, match="no byte"):
    adaspan.token_bytes(["256", "<eos>"], "enwik8")
  with pytest.raises(CheckpointError, match="neither"):
    adaspan.byte_permutation(["the", "cat", "<eos>"])
  with pytest.raises(CheckpointError, match="more than one"):
    adaspan.byte_permutation(["10", "<eos>"], scheme="enwik8")
  with pytest.raises(CheckpointError, match="only 100"):
    adaspan.byte_permutation(["120"], vocab_size=100)


# Raw texts with 11 distinct tokens plus <eos>: the toy checkpoint's 12 ids.
_RAW = {
    "enwik8": b"<p>Hi yo!</p>\nyo <b>!</b>\n",
    "text8": b"the cat sat in a hot mat",
}


def _authors_stream(raw: bytes, scheme: str) -> list[str]:
  """The token stream their `_tokenize` reads from the prep's train.txt."""
  text = _prep_enwik8(raw) if scheme == "enwik8" else _prep_text8(raw.decode())
  return [t for line in text.splitlines(keepends=True) for t in line.split() + ["<eos>"]]


@pytest.mark.parametrize("scheme", ["enwik8", "text8"])
def test_byte_model_computes_the_authors_log_probabilities(tmp_path, scheme):
  raw = _RAW[scheme]
  path = tmp_path / "train.txt"
  path.write_text(_prep_enwik8(raw) if scheme == "enwik8" else _prep_text8(raw.decode()),
                  encoding="utf8")
  vocab = adaspan.authors_vocabulary(path)
  assert len(vocab) == TOY_VOCAB and adaspan.vocabulary_from_raw(raw, scheme) == vocab
  ckpt = _toy_checkpoint()

  authors = _model()
  adaspan.load(authors, ckpt)  # their ids as they are
  zoo = _model(256, seed=3)
  init = _params(zoo)["in_emb/embedding"]
  report = adaspan.load(zoo, ckpt, vocabulary=str(path))  # the train.txt path
  info = report["vocabulary"]
  assert info["scheme"] == f"{scheme} scheme" and info["authors_size"] == TOY_VOCAB
  byte_of = adaspan.token_bytes(vocab)
  assert sorted(info["missing_ids"]) == sorted(set(range(256)) - set(byte_of.tolist()))
  assert any(k.startswith("in_emb/embedding[") for k in report["kept"])

  # The same text: their ids for their stream, the raw bytes for the zoo (without the
  # stream's final <eos> when the raw text does not end with a newline).
  stream = _authors_stream(raw, scheme)
  index = {t: i for i, t in enumerate(vocab)}
  their_ids = np.array([index[t] for t in stream])
  zoo_ids = byte_of[their_ids]
  if scheme == "enwik8":
    np.testing.assert_array_equal(zoo_ids, np.frombuffer(raw, np.uint8))
  else:  # text8: the stripped characters, spaces as bytes 32, then the one <eos>
    np.testing.assert_array_equal(zoo_ids[:-1], np.frombuffer(raw.strip(), np.uint8))
  authors.eval()
  zoo.eval()
  theirs = np.asarray(_forward(authors, jnp.asarray(their_ids[None], jnp.int32)))[0]
  ours = np.asarray(_forward(zoo, jnp.asarray(zoo_ids[None], jnp.int32)))[0]
  np.testing.assert_allclose(ours[:, byte_of], theirs, rtol=0, atol=2e-6)
  missing = np.asarray(info["missing_ids"])
  assert ours[:, missing].max() < -1000  # ~0 probability for bytes they never saw
  np.testing.assert_allclose(np.exp(ours[:, byte_of]).sum(-1), 1.0, atol=1e-5)

  params = _params(zoo)
  np.testing.assert_array_equal(params["in_emb/embedding"][missing], init[missing])
  assert (params["out_emb/kernel"][:, missing] == 0).all()
  assert (params["out_emb/bias"][missing] == adaspan.MISSING_LOGIT).all()
  state = adaspan.unwrap(ckpt)
  np.testing.assert_array_equal(params["in_emb/embedding"][byte_of], state["in_emb.weight"])
  np.testing.assert_array_equal(params["out_emb/kernel"][:, byte_of], state["out_emb.weight"].T)

  # A permutation array does the same as the token list; missing_logit=None keeps rows.
  again = _model(256, seed=3)
  adaspan.load(again, ckpt, vocabulary=info["permutation"], missing_logit=None)
  kept = _params(again)
  np.testing.assert_array_equal(kept["in_emb/embedding"], params["in_emb/embedding"])
  np.testing.assert_array_equal(kept["out_emb/bias"][missing],
                                _params(_model(256, seed=3))["out_emb/bias"][missing])
