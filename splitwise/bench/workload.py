"""The request list of `bench serve` / `bench compare` from their dataset flags (random, sharegpt)."""

from __future__ import annotations

from typing import Any

import click

from splitwise.commands.options import resolve_model
from splitwise.errors import SplitwiseError


def build_workload(opts: dict[str, Any], *, num_prompts: int, seed: int) -> list[Any]:
    from splitwise.bench.dataset import random_requests, sharegpt_requests
    from splitwise.engine.tokenizer import Tokenizer

    try:
        model_dir = resolve_model(opts["tokenizer"], default_size="small")
    except click.BadParameter as exc:
        raise ValueError(f"--tokenizer: {exc.message}") from None
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except SplitwiseError as exc:
        raise ValueError(f"--tokenizer: {str(exc).removeprefix('--model: ')}") from None
    endpoint = opts.get("endpoint", "completions")
    if opts.get("dataset_path") or opts.get("dataset_name") == "sharegpt":
        if not opts.get("dataset_path"):
            raise ValueError("--dataset-path: --dataset-name sharegpt needs a ShareGPT JSON file")
        return sharegpt_requests(
            tokenizer,
            opts["dataset_path"],
            num_prompts=num_prompts,
            seed=seed,
            output_len=opts.get("sharegpt_output_len"),
        )
    return random_requests(
        tokenizer,
        num_prompts=num_prompts,
        input_len=opts["random_input_len"],
        output_len=opts["random_output_len"],
        range_ratio=opts["random_range_ratio"],
        seed=seed,
        as_text=endpoint == "chat",
    )
