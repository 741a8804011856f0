#!/usr/bin/env python
"""Generate text from a checkpoint: the prompt followed by the model's continuation.

    python tools/generate.py --checkpoint DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T]
                             [--top-k K] [--top-p P] [--seed S] [--device cpu|cuda]
                             [--tokenizer-dir DIR] [--no-stop-at-eod] [--no-cache] [--threads N] [--json]

DIR is a step_NNNNNNNN directory or a checkpoint.dir (its newest complete checkpoint), saved at
any layout (dp/tp/ep/FSDP): it is consolidated and loaded in this one process. Sampling rules
(temperature, then top-k, then top-p; temperature 0 = greedy) and the KV cache: moetrain/generate.py.

- MoE routing: a capacity-bound token-choice router is built dropless (moe.capacity_factor=null;
  one `generate: note:` line on stderr), so a token's output does not depend on the others. Expert
  choice and PEER with query batch norm are not per-token: generation then runs without the cache,
  the whole prefix at every step (one `generate: warning:` line).
- Tokenizer: --tokenizer-dir, else the checkpoint's data.path for data.source=memmap (its
  meta.json names the tokenizer), else bytes (the embedded corpus). Text is decoded with
  replacement of invalid byte sequences. An empty prompt starts from the end-of-document token.
- Length: prompt + new tokens must fit model.max_seq_len (refused, no sliding window).
- Stops after --max-new-tokens or at the end-of-document token (not printed) unless --no-stop-at-eod.

Prints the text (stdout) and one summary line (stderr: tokens, why it stopped, tokens/s, cache),
or with --json one object: checkpoint, step, prompt, completion (the new text), text (prompt +
completion), prompt_ids, completion_ids (ending with the end-of-document id when it stopped
there), stop ("eod" | "max_new_tokens"), cache (bool), tokens_per_s and seconds (prefill +
decoding), notes. --threads sets the CPU intra-op threads (default 1: a decoding step's small ops
only wait on more threads; 0 = torch's default).

Exit codes: 0 ok, 1 the checkpoint is damaged or unreadable, 2 bad arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TOOLS), _TOOLS]

import torch  # noqa: E402

from moetrain import growth  # noqa: E402
from moetrain.checkpoint.convert import read_checkpoint, run_tool  # noqa: E402
from moetrain.config import ConfigError  # noqa: E402
from moetrain.generate import GenerateError, check_request, check_sampling, generate, inference_config  # noqa: E402
from moetrain.tokenizer import TokenizerError, codec_for_data, load_codec  # noqa: E402

PROG = "generate"


def codec_for(cfg, tokenizer_dir):
    """The tokenizer the checkpoint was trained with (see the module docstring)."""
    if tokenizer_dir:
        return load_codec(tokenizer_dir)
    try:
        return codec_for_data(cfg.data.source, cfg.data.path)
    except TokenizerError as e:
        raise TokenizerError(f"{e}; the checkpoint was trained on data.path={cfg.data.path}: "
                             "pass --tokenizer-dir DIR") from None


def run(args) -> dict:
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device here")
    if args.threads < 0:
        raise GenerateError(f"--threads {args.threads} must be >= 0 (0 = torch's default)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not os.path.exists(args.checkpoint):
        raise GenerateError(f"--checkpoint {args.checkpoint}: no such file or directory")
    info, full = read_checkpoint(args.checkpoint)
    cfg, notes = inference_config(growth.config_from_dict(full["manifest"].get("config")))
    codec = codec_for(cfg, args.tokenizer_dir)
    prompt_ids = codec.encode(args.prompt)
    from_eod = not prompt_ids          # a new document: after an end-of-document token
    if from_eod:
        if codec.eod_id is None:
            raise GenerateError("empty --prompt and the tokenizer has no end-of-document token to start from")
        prompt_ids = [codec.eod_id]
    check_request(prompt_ids, args.max_new_tokens, cfg.model.vocab_size, cfg.model.max_seq_len)
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    model = growth.build_model(cfg, full["model"]).to(torch.device(args.device))
    g = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, eod_id=codec.eod_id, stop_at_eod=args.stop_at_eod,
                 use_cache=False if args.no_cache else None, vocab_limit=codec.vocab_size)
    for note in g.notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    shown = g.new_ids[:-1] if g.stop == "eod" else g.new_ids
    text_ids = (prompt_ids[1:] if from_eod else prompt_ids) + shown
    return {"checkpoint": info.path, "step": info.step, "prompt": args.prompt, "completion": codec.decode(shown),
            "text": codec.decode(text_ids), "prompt_ids": prompt_ids, "completion_ids": g.new_ids, "stop": g.stop,
            "cache": g.used_cache, "tokens_per_s": g.tokens_per_s, "seconds": g.seconds, "notes": notes + g.notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a step directory or a checkpoint.dir")
    ap.add_argument("--prompt", default="", help="text to continue (default: empty = a new document)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokenizer-dir", help="token directory whose meta.json names the tokenizer "
                                            "(default: the checkpoint's data.path, or bytes)")
    ap.add_argument("--no-stop-at-eod", dest="stop_at_eod", action="store_false",
                    help="continue past the end-of-document token")
    ap.add_argument("--no-cache", action="store_true", help="run the whole prefix at every step (for timing)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: one token's small ops only wait on more; 0 = torch's default)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the text")
    args = ap.parse_args(argv)

    def body():
        res = run(args)
        if args.json:
            print(json.dumps(res))
        else:
            print(res["text"])
            print(f"{PROG}: {len(res['completion_ids'])} tokens ({res['stop']}), {res['tokens_per_s']:.1f} tokens/s, "
                  f"{'KV cache' if res['cache'] else 'no cache'}", file=sys.stderr)
    return run_tool(PROG, body, (ConfigError, GenerateError, TokenizerError, growth.GrowthError))


if __name__ == "__main__":
    sys.exit(main())
