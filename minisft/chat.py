"""`python -m minisft.chat`: talk to a model, a fine-tuned one included.

    python -m minisft.chat --model_name_or_path outputs/run-20250101-120000 "微调测试"   # one answer
    python -m minisft.chat --model_name_or_path outputs/run-20250101-120000              # a chat session

--model_name_or_path takes a full model folder, a LoRA adapter folder (its base model is loaded
and the adapter merged in), or the embedded model's name. Answers are greedy unless --temperature
is above 0, and stream as they are generated. In a session the whole conversation is the prompt
of each answer, laid out by the model's chat template (minisft/machinery/generate.py).
"""

from __future__ import annotations

import argparse
import sys

import transformers
from rich.console import Console
from transformers import TextStreamer

from .machinery.cli import run
from .machinery.generate import check_sampling, generate, load_for_chat
from .machinery.models import EMBEDDED_MODEL_NAME


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minisft.chat", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="Answer this one prompt and exit. Without it: a chat session.")
    parser.add_argument(
        "--model_name_or_path",
        default=EMBEDDED_MODEL_NAME,
        help=f"A model folder, a LoRA adapter folder, a hub id, or {EMBEDDED_MODEL_NAME!r} (default).",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="The most tokens one answer may have.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default). Above 0: sample.")
    parser.add_argument("--top_p", type=float, default=1.0, help="When sampling: keep the top tokens of this mass.")
    parser.add_argument("--system_prompt", help="A system turn to open the conversation with.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Run code shipped with a hub model.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    transformers.logging.disable_progress_bar()  # a bar for a one-second weight load is noise
    args = parse_args(argv)
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)  # before the model loads, not after
    console = Console(stderr=True)
    with console.status(f"loading {args.model_name_or_path}"):
        model, tokenizer = load_for_chat(args.model_name_or_path, args.trust_remote_code)
    conversation = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []

    def reply(prompt: str) -> None:
        conversation.append({"role": "user", "content": prompt})
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        [answer] = generate(
            model, tokenizer, [conversation], args.max_new_tokens, args.temperature, args.top_p, streamer=streamer
        )
        conversation.append({"role": "assistant", "content": answer})

    if args.prompt is not None:
        reply(args.prompt)
        return
    console.print("Chatting with the model; an empty line or Ctrl-D ends the session.")
    while True:
        try:
            prompt = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            break
        if not prompt.strip():
            break
        reply(prompt)


if __name__ == "__main__":
    run(main)
