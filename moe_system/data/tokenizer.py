"""Tokenizers: the bundled unigram tokenizer (trained on first use, cached), local directories and sentencepiece
.model files, and Hugging Face hub names.

Every tokenizer we hand out follows the umT5 / OpenMoE conventions the model relies on: pad = 0 (also used as BOS),
eos = 1. Anything else is refused with a DataError that says what to pass instead.
"""

import collections
import hashlib
import io
import json
import os
import re
import shutil
import tempfile

from .errors import DataError
from .paths import BUNDLED_DIR, cache_root

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_SENTINELS = 32  # <extra_id_0> .. <extra_id_31>, for a span-corruption objective
MIN_TOKENIZER_SIZE = 256  # anything smaller is a broken load (e.g. specials only), not a real tokenizer
BUNDLED_VOCAB_SIZE = 1024

# Unigram, umT5 layout (pad 0, eos 1, unk 2, no bos), byte fallback so no character is ever <unk> in sentencepiece.
# One thread and no shuffling make training deterministic. hard_vocab_limit=False: the bundled corpus is small and
# templated, so it supports fewer than 1024 pieces; the result is at most 1024.
TRAINER_SETTINGS = dict(
    model_type="unigram", vocab_size=BUNDLED_VOCAB_SIZE, hard_vocab_limit=False,
    pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
    user_defined_symbols=[f"<extra_id_{i}>" for i in range(NUM_SENTINELS)],
    character_coverage=1.0, split_by_number=False,  # keeps "▁7" one piece: digits in our data are space-separated
    num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
)


def bundled_corpus() -> list[str]:
    """Tokenizer training text: every train prompt+completion and every line of text.txt (never held-out data)."""
    lines = []
    with open(os.path.join(BUNDLED_DIR, "train.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            lines.append(record["prompt"] + record["completion"])
    with open(os.path.join(BUNDLED_DIR, "text.txt"), encoding="utf-8") as f:
        lines += [line for line in f.read().splitlines() if line.strip()]
    return lines


def seed_pieces(lines: list[str], max_piece_length: int = 16) -> list[tuple[str, int]]:
    """Candidate pieces for unigram training: every substring of every word, scored frequency x length.

    sentencepiece >= 0.2 finds its own candidates with a suffix array and keeps only substrings seen in more than
    one context. In our templated corpus a word like "capital" is always followed by the same text, so it never
    becomes a candidate and the trained vocabulary is mostly single characters. Giving the seeds explicitly fixes
    that. Words are split like sentencepiece splits them (letters, digits and symbols apart).
    """
    words = collections.Counter(word for line in lines for word in line.split())
    scores = collections.Counter()
    for word, count in words.items():
        for part in re.findall(r"▁?(?:[^\W\d_]+|\d+|[^\w\s▁]+)", "▁" + word):
            for start in range(len(part)):
                for end in range(start + 2, min(len(part), start + max_piece_length) + 1):
                    scores[part[start:end]] += count * (end - start)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def train_bundled_tokenizer(out_dir: str) -> str:
    """Train the bundled tokenizer into out_dir: spiece.model plus tokenizer.json/tokenizer_config.json."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    os.makedirs(out_dir, exist_ok=True)
    lines = bundled_corpus()
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seeds_path = os.path.join(tmp, "seeds.tsv")
        with open(seeds_path, "w", encoding="utf-8") as f:
            f.writelines(f"{piece}\t{score}\n" for piece, score in seed_pieces(lines))
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       seed_sentencepieces_file=seeds_path, **TRAINER_SETTINGS)
    # The trainer records the seeds file's (temporary) path in the model; drop it so the bytes are reproducible.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.trainer_spec.ClearField("seed_sentencepieces_file")
    model_path = os.path.join(out_dir, "spiece.model")
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())
    load_sentencepiece_file(model_path).save_pretrained(out_dir)
    return out_dir


def bundled_tokenizer_dir() -> str:
    """The cached bundled tokenizer, trained on first use.

    The cache key covers everything the result depends on (corpus bytes, this file's training code, library
    versions), so a changed corpus or recipe never reuses a stale tokenizer. Training goes into a temporary
    directory that is renamed into place, so a crash or a concurrent process never leaves a half-written one.
    """
    import sentencepiece
    import transformers

    digest = hashlib.sha256()
    for path in (os.path.join(BUNDLED_DIR, "train.jsonl"), os.path.join(BUNDLED_DIR, "text.txt"), __file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(f"{sentencepiece.__version__} {transformers.__version__}".encode())
    root = os.path.join(cache_root(), "tokenizers")
    final = os.path.join(root, f"bundled-{digest.hexdigest()[:16]}")
    if os.path.isfile(os.path.join(final, "tokenizer.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    try:
        train_bundled_tokenizer(tmp)
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, "tokenizer.json")):  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def enable_byte_fallback(tokenizer) -> None:
    """Give a converted unigram tokenizer the byte fallback of the sentencepiece model it came from.

    transformers 5.x builds T5Tokenizer's unigram model with byte_fallback=False (also when reloading a saved
    tokenizer.json), so characters sentencepiece encodes as <0xNN> pieces would become <unk>. When the vocabulary
    holds all 256 byte pieces, switch fallback on in the backend and decode bytes back to text.
    """
    from tokenizers import decoders
    from tokenizers.models import Unigram

    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())["model"]
    if spec["type"] != "Unigram" or spec.get("byte_fallback"):
        return
    pieces = {piece for piece, _ in spec["vocab"]}
    if not all(f"<0x{b:02X}>" in pieces for b in range(256)):
        return
    backend.model = Unigram([tuple(item) for item in spec["vocab"]], spec["unk_id"], byte_fallback=True)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), backend.decoder])


def load_sentencepiece_file(path: str):
    """A sentencepiece .model file as a Hugging Face tokenizer with the same ids.

    In transformers 5.x only from_pretrained(dir) converts a .model (T5Tokenizer(vocab_file=...) does not), so the
    file is copied into a temporary directory under the name each class looks for.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizer, T5Tokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:
        raise DataError(f"{path} is not a sentencepiece model ({e}); pass a sentencepiece .model file") from e
    with tempfile.TemporaryDirectory() as tmp:
        if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
            # T5Tokenizer assumes a unigram model and gives wrong ids for BPE; LlamaTokenizer converts BPE.
            shutil.copy(path, os.path.join(tmp, "tokenizer.model"))
            return LlamaTokenizer.from_pretrained(tmp)
        shutil.copy(path, os.path.join(tmp, "spiece.model"))
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0)  # the model's own pieces, no extra sentinels


def load_directory(path: str):
    from transformers import AutoTokenizer

    if any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise DataError(f"could not load the tokenizer in {path}: {e}") from e
    for name in ("spiece.model", "tokenizer.model"):
        if os.path.isfile(os.path.join(path, name)):
            return load_sentencepiece_file(os.path.join(path, name))
    raise DataError(f"{path} holds no tokenizer (no tokenizer.json, tokenizer_config.json, spiece.model or "
                    "tokenizer.model); pass a tokenizer directory or a sentencepiece .model file")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


def looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else that does not exist locally is a mistyped path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".model", ".json"))


def load_hub_tokenizer(name: str):
    # With HF_HUB_OFFLINE set, transformers 5.x "loads" an uncached hub tokenizer as ~100 special tokens instead
    # of failing, so we refuse before asking it.
    if env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE"):
        raise DataError(f"tokenizer {name!r} is not a local path and we are offline (HF_HUB_OFFLINE or "
                        "TRANSFORMERS_OFFLINE is set): pass a local tokenizer directory or a sentencepiece .model "
                        "file, or leave --tokenizer unset for the bundled tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise DataError(f"could not load tokenizer {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                        "check the name and the network, or pass a local tokenizer directory") from e


def check_tokenizer(tokenizer, source: str, vocab_size: int | None) -> None:
    size = len(tokenizer)
    if size < MIN_TOKENIZER_SIZE:
        raise DataError(f"tokenizer {source} has only {size} tokens, which is not a usable tokenizer (an incomplete "
                        "download or an offline hub load?); pass a local tokenizer directory or .model file")
    if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id != EOS_ID:
        raise DataError(f"tokenizer {source} has pad id {tokenizer.pad_token_id} and eos id "
                        f"{tokenizer.eos_token_id}, but OpenMoE uses pad = bos = {PAD_ID} and eos = {EOS_ID} "
                        "(the umT5 layout); use a umT5/T5-style tokenizer or the bundled one")
    if vocab_size is not None and size > vocab_size:
        raise DataError(f"tokenizer {source} has {size} tokens but the model's vocab is {vocab_size}; use a model "
                        "whose vocab_size is at least the tokenizer's size, or a smaller tokenizer")


def load_tokenizer(name_or_path: str | None = None, *, vocab_size: int | None = None):
    """The bundled tokenizer (None), a local directory, a sentencepiece .model file, or a hub name.

    vocab_size, when given, is the model's embedding size: a tokenizer with more tokens is refused.
    """
    if name_or_path is None:
        source, tokenizer = "bundled", load_directory(bundled_tokenizer_dir())
    else:
        path = os.path.expanduser(name_or_path)
        source = repr(name_or_path)
        if os.path.isdir(path):
            tokenizer = load_directory(path)
        elif os.path.isfile(path):
            if not path.endswith(".model"):
                raise DataError(f"tokenizer {source} is a file but not a sentencepiece .model; pass a .model file "
                                "or a directory with tokenizer.json / spiece.model")
            tokenizer = load_sentencepiece_file(path)
        elif looks_like_path(name_or_path):
            raise DataError(f"tokenizer path {source} does not exist")
        else:
            tokenizer = load_hub_tokenizer(name_or_path)
    enable_byte_fallback(tokenizer)
    check_tokenizer(tokenizer, source, vocab_size)
    return tokenizer
