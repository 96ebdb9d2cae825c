"""The pre-flight audit on the demo data: what the whole split will teach, before a run spends a GPU on it.

It audits the demo data twice: as it is (clean: no warning), then with a response template that stops before
<|im_end|>, the trap of a model that never learns to stop. The same as

    python -m minisft.inspect --audit
    python -m minisft.inspect --audit --response_template "<|im_start|>assistant\n" --instruction_template "<|im_end|>"

    python examples/04_audit.py       # a few seconds
"""

from minisft.inspect import main

print("The demo data, every token trained:")
main(["--audit"])
print("\nThe same data, trained from each assistant header up to, not including, its <|im_end|>:")
main(["--audit", "--response_template", "<|im_start|>assistant\n", "--instruction_template", "<|im_end|>"])
