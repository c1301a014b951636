"""`splitwise generate`: run one prompt through the engine and print the completion."""

from __future__ import annotations

import json
import sys

import click

from splitwise.commands.options import resolve_model


@click.command("generate")
@click.option(
    "--model",
    "model",
    default=None,
    help="Local Hugging Face model directory (default: built-in tiny model).",
)
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option(
    "--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0.0, max=1.0, min_open=True)
)
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=None, type=int, help="Per-request seed: the same seed gives the same output.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--chat", is_flag=True, help="Wrap the prompt as a user message with the model's chat template."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object: prompt_token_ids, token_ids, text."
)
def generate(
    model: str | None,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    dtype: str,
    device: str,
    chat: bool,
    as_json: bool,
) -> None:
    """Generate a completion for PROMPT with the paged-KV engine."""
    from splitwise.engine.config import EngineConfig
    from splitwise.engine.engine import LLMEngine
    from splitwise.engine.sampling_params import SamplingParams

    model_dir = resolve_model(model)
    try:
        config = EngineConfig(model=str(model_dir), dtype=dtype, device=device)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    engine = LLMEngine(config)
    try:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        prompt_ids = engine.tokenizer.encode(text, add_special_tokens=not chat)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
        )
        result = engine.generate([prompt_ids], params)[0]
    finally:
        engine.close()
    if result.error:
        raise click.ClickException(result.error)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "prompt_token_ids": result.prompt_token_ids,
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "logprobs": result.logprobs,
                    "finish_reason": result.finish_reason.value,
                }
            )
        )
    else:
        sys.stdout.write(result.text + "\n")
