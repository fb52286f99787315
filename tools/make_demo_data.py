"""Build a small offline demo corpus in the Parameter Golf shard format.

A fresh machine has no FineWeb download, yet the training pipeline expects
``fineweb_train_*.bin`` / ``fineweb_val_*.bin`` shards plus a SentencePiece model.
This tool makes both from text that every Python install already has: the
standard library's docstrings and comments and the ``pydoc`` help topics. The
output is byte-identical across runs on the same Python version, so smoke tests
and demos are reproducible without any network access. The shards are written by
write_shard, the inverse of the reader that training uses.

    python -m tools.make_demo_data          # from the repository root
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

import train_gpt

DEFAULT_OUT_DIR = Path("data/demo_sp1024")
DEFAULT_CHALLENGE_TOKENIZER = Path("data/tokenizers/fineweb_1024_bpe.model")
DEFAULT_SEED = 1337
DEFAULT_SHARD_TOKENS = 10_000_000

VOCAB_SIZE = 1024
MIN_DOC_CHARS = 40
VAL_DOC_FRACTION = 0.05
VAL_MIN_TOKENS = 70_000
# Measured on this corpus with the trained 1024-piece tokenizer (about 2.6 chars per token);
# rounded up so the held-out split reaches VAL_MIN_TOKENS before the tokenizer exists.
VAL_CHARS_PER_TOKEN_ESTIMATE = 3.0
# Never hold out more than this, so small corpora still keep most text for training.
VAL_MAX_DOC_FRACTION = 0.25

SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = train_gpt.DATA_MANIFEST  # train_gpt checks the tokenizer hash it names


def normalize_text(text: str) -> str:
    """Trim trailing spaces and collapse blank-line runs, keeping paragraphs and indentation."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def list_stdlib_sources(stdlib_root: Path) -> list[Path]:
    """List stdlib ``.py`` files in a stable order, skipping tests and bundled third-party code."""
    sources: list[Path] = []
    for dir_path, dir_names, file_names in os.walk(stdlib_root):
        dir_names[:] = sorted(name for name in dir_names if name not in SKIPPED_STDLIB_DIRS)
        sources.extend(Path(dir_path) / name for name in sorted(file_names) if name.endswith(".py"))
    return sources


def collect_docstrings(tree: ast.AST) -> list[str]:
    """Docstrings of the module and of every class and function nested inside it."""
    docstrings: list[str] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            docstrings.append(docstring)
        # Docstrings can only live on these nodes, so walking their bodies is enough and
        # much faster than ast.walk over every expression.
        pending.extend(child for child in node.body if isinstance(child, DOCSTRING_NODES))
    return docstrings


def collect_comments(source: str) -> str:
    """All full-line comments of one file as a single text, without the ``#`` markers."""
    comment_lines = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            comment_lines.append(stripped.lstrip("#").strip())
    return "\n".join(comment_lines)


def collect_documents(stdlib_root: Path) -> list[str]:
    """Raw documents: stdlib docstrings, per-file comment blocks and pydoc help topics."""
    from pydoc_data.topics import topics

    documents: list[str] = []
    for source_path in list_stdlib_sources(stdlib_root):
        try:
            source = source_path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(source_path))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        documents.extend(collect_docstrings(tree))
        documents.append(collect_comments(source))
    documents.extend(topics[name] for name in sorted(topics))
    return documents


def prepare_documents(raw_documents: list[str], seed: int) -> list[str]:
    """Normalize, filter, deduplicate and deterministically shuffle the documents."""
    unique_documents = {normalize_text(document) for document in raw_documents}
    kept = [document for document in unique_documents if len(document) >= MIN_DOC_CHARS]
    # Set order varies between processes, so fix an order by content hash before shuffling.
    kept.sort(key=lambda document: hashlib.sha1(document.encode("utf-8")).hexdigest())
    random.Random(seed).shuffle(kept)
    return kept


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """Hold out a validation prefix: at least 5% of docs and enough text for VAL_MIN_TOKENS."""
    min_val_docs = max(1, round(len(documents) * VAL_DOC_FRACTION))
    max_val_docs = max(min_val_docs, int(len(documents) * VAL_MAX_DOC_FRACTION))
    target_val_chars = VAL_MIN_TOKENS * VAL_CHARS_PER_TOKEN_ESTIMATE
    val_doc_count = 0
    val_chars = 0
    while val_doc_count < max_val_docs and (
        val_doc_count < min_val_docs or val_chars < target_val_chars
    ):
        val_chars += len(documents[val_doc_count])
        val_doc_count += 1
    return documents[val_doc_count:], documents[:val_doc_count]


def train_tokenizer(train_documents: list[str]) -> bytes:
    """Train a SentencePiece BPE with the challenge tokenizer's settings; returns the model."""
    training_lines = [
        line for document in train_documents for line in document.splitlines() if line.strip()
    ]
    model_buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines),
        model_writer=model_buffer,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        split_digits=True,
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=0.999,
        # Multi-threaded BPE merges can tie-break differently between runs.
        num_threads=1,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model_buffer.getvalue()


def tokenize_documents(processor: spm.SentencePieceProcessor, documents: list[str]) -> np.ndarray:
    """Concatenate ``[BOS] + tokens`` for each document, like the challenge's shards."""
    bos_id = processor.bos_id()
    token_lists = processor.encode(documents)
    return np.fromiter(
        (token for token_list in token_lists for token in (bos_id, *token_list)),
        dtype=np.int32,  # write_shard checks that every id fits the shards' uint16
    )


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """The inverse of train_gpt.read_shard: the header, then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: token ids must fit uint16 (got {tokens.min()}..{tokens.max()})")
    header = np.zeros(train_gpt.HEADER_WORDS, dtype="<i4")
    header[:3] = train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, tokens.size
    Path(path).write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def write_split(out_dir: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> dict[str, int]:
    """Write a split as numbered shards; returns ``{file name: token count}``."""
    shard_token_counts: dict[str, int] = {}
    for shard_index, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        shard_name = f"fineweb_{split}_{shard_index:06d}.bin"
        shard = tokens[start : start + shard_tokens]
        write_shard(out_dir / shard_name, shard)
        shard_token_counts[shard_name] = int(shard.size)
    return shard_token_counts


def python_version() -> str:
    return ".".join(str(part) for part in sys.version_info[:3])


def is_up_to_date(out_dir: Path, expected_settings: dict[str, object]) -> bool:
    """True when a previous build with the same settings left every file it listed intact."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in expected_settings.items()):
        return False
    if not (out_dir / TOKENIZER_FILE).is_file():
        return False
    try:
        return all(
            train_gpt.read_shard(out_dir / shard_name).size == token_count
            for shard_name, token_count in manifest.get("shards", {}).items()
        )
    except (OSError, ValueError):
        return False


def build_demo_data(
    out_dir: Path,
    seed: int = DEFAULT_SEED,
    challenge_tokenizer: Path | None = DEFAULT_CHALLENGE_TOKENIZER,
    max_train_tokens: int = 0,
    force: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Build (or reuse) the demo shards and tokenizer in ``out_dir``; returns the manifest.

    ``challenge_tokenizer`` is copied when it exists; pass ``None`` to always train one.
    ``max_train_tokens`` truncates the train split (0 keeps everything).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    tokenizer_to_copy = (
        Path(challenge_tokenizer)
        if challenge_tokenizer is not None and Path(challenge_tokenizer).is_file()
        else None
    )
    expected_settings: dict[str, object] = {
        "seed": seed,
        "max_train_tokens": max_train_tokens,
        "shard_tokens": shard_tokens,
        "python_version": python_version(),
        "tokenizer_source": "trained" if tokenizer_to_copy is None else "challenge",
    }
    if tokenizer_to_copy is not None:
        # A replaced challenge tokenizer changes every token id, so the shards must be rebuilt.
        expected_settings["tokenizer_sha256"] = train_gpt.file_sha256(tokenizer_to_copy)
    manifest_path = out_dir / MANIFEST_FILE
    if not force and is_up_to_date(out_dir, expected_settings):
        print(f"{out_dir} is up to date (use --force to rebuild)")
        return json.loads(manifest_path.read_text(encoding="utf-8"))

    stdlib_root = Path(sysconfig.get_paths()["stdlib"])
    documents = prepare_documents(collect_documents(stdlib_root), seed)
    train_documents, val_documents = split_documents(documents)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Remove the manifest first so an interrupted rebuild is never mistaken for a finished one,
    # and old shards so a smaller rebuild cannot leave extra ones behind.
    manifest_path.unlink(missing_ok=True)
    for stale_shard in out_dir.glob("fineweb_*.bin"):
        stale_shard.unlink()

    tokenizer_path = out_dir / TOKENIZER_FILE
    if tokenizer_to_copy is None:
        tokenizer_path.write_bytes(train_tokenizer(train_documents))
    else:
        shutil.copyfile(tokenizer_to_copy, tokenizer_path)
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

    train_tokens = tokenize_documents(processor, train_documents)
    if max_train_tokens > 0:
        train_tokens = train_tokens[:max_train_tokens]
    val_tokens = tokenize_documents(processor, val_documents)

    shards = write_split(out_dir, "train", train_tokens, shard_tokens)
    shards.update(write_split(out_dir, "val", val_tokens, shard_tokens))
    manifest = {
        **expected_settings,
        "tokenizer_sha256": train_gpt.file_sha256(tokenizer_path),
        "vocab_size": processor.vocab_size(),
        "train_docs": len(train_documents),
        "val_docs": len(val_documents),
        "train_tokens": int(train_tokens.size),
        "val_tokens": int(val_tokens.size),
        "shards": shards,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    elapsed = time.perf_counter() - started
    print(
        f"demo data -> {out_dir}: {len(documents)} docs ({len(train_documents)} train / "
        f"{len(val_documents)} val), {train_tokens.size:,} train tokens, "
        f"{val_tokens.size:,} val tokens, tokenizer={manifest['tokenizer_source']}, "
        f"{elapsed:.1f}s"
    )
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="document shuffle seed")
    parser.add_argument(
        "--challenge-tokenizer",
        type=Path,
        default=DEFAULT_CHALLENGE_TOKENIZER,
        help="copy this tokenizer if it exists instead of training one",
    )
    parser.add_argument(
        "--max-train-tokens", type=int, default=0, help="truncate the train split (0 = all)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    build_demo_data(
        out_dir=args.out,
        seed=args.seed,
        challenge_tokenizer=args.challenge_tokenizer,
        max_train_tokens=args.max_train_tokens,
        force=args.force,
        shard_tokens=args.shard_tokens,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
