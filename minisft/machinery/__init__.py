"""The machinery around the lesson in minisft/sft: what a real run needs and a learner can skip.

config.py       every flag, in TRL's and transformers' names, and every check on them (run as they are read)
cli.py          the command line: flags, one-line errors, exit codes
loop.py         the run, top to bottom: output folder → data → model → steps (sft/step.py) → outputs
outputs.py      the output folder: its lock, and what a run may remove from it
data_files.py   file readers: JSONL, JSON, parquet, CSV, folders, hub datasets; splits
mixture.py      a --config file's datasets: list, each source in its proportion of an epoch
prepare.py      a whole split through the lesson's first three files, in worker processes
storage.py      prepared examples as flat memory-mapped arrays
cache.py        prepared splits kept by a hash of everything they depend on, checked before reuse
pack_plans.py   packing plans kept beside the prepared split
audit.py        the pre-flight audit of a prepared split (inspect --audit; its warnings before step 1)
checkpoint.py   checkpoints: atomic, checksummed, verified on resume
best_checkpoint.py  --load_best_model_at_end and early stopping: the best evaluation, and when to stop
distributed.py  torchrun: DDP and FSDP2 behind one small object the step takes
stopping.py     Ctrl-C and SIGTERM: stop at a step's end, save, exit
reporting.py    metrics.jsonl and the trackers
progress.py     the run's progress: a bar in a terminal, a line per log when piped, a table in Jupyter
models.py       models and tokenizers, the embedded model, 4-bit loading
peft_files.py   peft's adapter files, read and written
generate.py     asking a model, as chat and the probes do
probes.py       --probe_prompts: the model's answers before, during and after training
extras.py       optional packages, each with the command that installs it
"""
