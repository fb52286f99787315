"""Train a benchmark's teacher once, to the flat end of its curve (the start of cpu_converged).

On 8xH100 the competition's teacher sees ~100 tokens per non-embedding parameter and its curve is
flat; two CPU cores in minutes give a teacher ~6, where every transformer is starved and a table
of counts looks strong. This trains the teacher of the settings (PROFILE, the shape settings,
DATA_PATH) for TOKENS_PER_PARAMETER x its non-embedding parameters at a constant learning rate
after the warm-up (the stable phase of a warm-up / stable / decay schedule: each benchmark run's
own warm-down is the decay), and writes INIT_CHECKPOINT, which the runs then start from:

    PROFILE=cpu_converged DATA_PATH=... TOKENIZER_PATH=... python -m tools.pretrain_teacher

It shows its progress, saves a resumable state every --save-every steps beside the checkpoint
(PATH.partial) and resumes from it when run again with the same settings (also for more tokens
once the checkpoint is removed); an existing checkpoint is never overwritten. One process.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

import train_gpt


def non_embedding_parameters(model: train_gpt.GPT) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed"))


def pretrain(args: train_gpt.Hyperparameters, tokens_per_parameter: float, save_every: int,
             echo=print) -> Path:
    """Train (or resume) and write args.init_checkpoint; returns its path."""
    path = Path(args.init_checkpoint)
    if path.exists():
        raise FileExistsError(f"INIT_CHECKPOINT={args.init_checkpoint!r} exists: remove it or "
                              "choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    runtime = train_gpt.Runtime(0, 1, 0, torch.device("cuda" if torch.cuda.is_available()
                                                       else "cpu"), None)
    torch.manual_seed(args.seed)
    config = train_gpt.settings_view(train_gpt.GPTConfig, args)
    model = train_gpt.GPT(config).to(runtime.device)
    train = train_gpt.shard_paths(args.data_path, "train")
    identity = dict(config=dataclasses.asdict(config), data=train_gpt.data_fingerprint(train),
                    batch_tokens=args.train_batch_tokens, seq_len=args.train_seq_len,
                    seed=args.seed)
    total_steps = math.ceil(tokens_per_parameter * non_embedding_parameters(model)
                            / args.train_batch_tokens)
    optimizers = train_gpt.build_optimizers(model, args)
    step, taken = 0, 0
    if partial.exists():
        state = torch.load(partial, map_location=runtime.device, weights_only=True)
        if state["identity"] != identity:
            raise ValueError(f"{partial}: a partial run of other settings ({state['identity']}); "
                             "remove it to start again")
        model.load_state_dict(state["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        step, taken = state["step"], state["taken"]
        echo(f"resuming {partial} at step {step} of {total_steps}")
    loader = train_gpt.DistributedTokenLoader(train, runtime, args.vocab_size)
    if taken:
        loader.stream.take(taken)  # where the stream stood
    corpus = loader.stream.corpus_tokens
    started = time.perf_counter()
    while step < total_steps:
        # A segment at the constant rate: only the first warms up, none warms down.
        segment = dataclasses.replace(args, warmdown_frac=0.0, train_log_every=10**9,
                                      warmup_steps=args.warmup_steps if step == 0 else 0,
                                      muon_momentum_warmup_steps=0 if step else
                                      args.muon_momentum_warmup_steps)
        steps = min(save_every, total_steps - step)
        phase = train_gpt.Phase(train_gpt.TEACHER_PHASE, lambda m, x, y: m(x, y),
                                args.train_batch_tokens, args.train_seq_len, math.inf, steps)
        stats = train_gpt.run_training(runtime, segment, model, phase, loader, optimizers)
        step += stats["steps"]
        train_gpt.write_atomically(partial, _serialized(dict(
            identity=identity, step=step, taken=loader.stream.taken, model=model.state_dict(),
            optimizers={name: o.state_dict() for name, o in optimizers.items()})))
        seen = step * args.train_batch_tokens
        echo(f"step {step}/{total_steps} loss {stats['loss']:.4f} passes {seen / corpus:.2f} "
             f"tokens/param {seen / non_embedding_parameters(model):.1f} "
             f"{stats['step_ms']:.0f} ms/step elapsed {time.perf_counter() - started:.0f} s")
    train_gpt.write_atomically(path, _serialized(dict(
        config=identity["config"], data=identity["data"], state=model.state_dict(),
        tokens=step * args.train_batch_tokens, passes=step * args.train_batch_tokens / corpus,
        non_embedding_parameters=non_embedding_parameters(model), identity=identity)))
    echo(f"wrote {path} (its training state stays in {partial}: a longer run resumes there)")
    return path


def _serialized(state: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-parameter", type=float, default=100.0,
                        help="training tokens per non-embedding parameter (default 100)")
    parser.add_argument("--save-every", type=int, default=200,
                        help="steps between resumable saves (default 200)")
    options = parser.parse_args(argv)
    args = train_gpt.Hyperparameters.from_env()
    if not args.init_checkpoint:
        print("INIT_CHECKPOINT is empty: set it, or use PROFILE=cpu_converged", file=sys.stderr)
        return 2
    torch.set_num_threads(train_gpt.cpu_share())
    pretrain(args, options.tokens_per_parameter, options.save_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
