"""Every command line meets bad input with one line and the right exit status.

Each case runs the real program (`python -m ...`) and checks: exit status 2
for a usage error and 1 for a runtime failure; exactly one line on stderr,
`<program>: error: <message>`, holding the expected words; no traceback. The
README's table "Bad input, command by command" is generated from these cases
and their observed messages (`python -m tests.cli_table`); each case also checks
that its README row is current, so the table cannot go stale.

Placeholders in the arguments: {tmp} a fresh directory, {run} a trained
4-step tiny softmax run, {empty} an empty directory, {fresh} a workdir with a
config.json and no checkpoint, {bad_config} a config file with a syntax error, {no_sweep} a Python
file without get_sweep(), {docs} a JSON-lines file whose records have the fields body and id,
{bad_parquet} a .parquet file that is not Parquet, {bad_tokenizer} a .json file that is not a
tokenizer, {hf_mixtral} and {hf_yarn} Hugging Face checkpoint directories (config.json only) of
an architecture and a RoPE scaling that attnlab.convert does not take.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Lines that native libraries print on their own (the CUDA plugin's probe on a
# host without a GPU), not attnlab's.
NOISE = re.compile(
  r"^(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} .*(cudart_stub|cuda_))"
)
TABLE_DIR_ENV = "ATTNLAB_CLI_TABLE_DIR"  # set by tests.cli_table: write observed rows there


@dataclasses.dataclass(frozen=True)
class Case:
  program: str  # the module run with python -m
  args: str
  code: int  # 2: usage error, 1: runtime failure
  expect: str  # words the one line must hold
  what: str  # the bad input, in words

  @property
  def id(self) -> str:
    return (
      f"{self.program.split('.')[-1]}-{re.sub(r'[^a-z0-9]+', '_', self.what.lower()).strip('_')}"
    )


TRAIN, EVAL, SAMPLE, ANALYZE = (
  "attnlab.train",
  "attnlab.evaluate",
  "attnlab.sample",
  "attnlab.analyze",
)
PLAN, SWEEP, COMPARE, PREPARE = (
  "attnlab.plan",
  "attnlab.sweep",
  "attnlab.compare",
  "attnlab.data.prepare",
)
REPORT = "benchmarks.kernel_report"
CONVERT = "attnlab.convert"
TINY = "--config=configs/tiny.py"

CASES = [
  Case(TRAIN, "--config=configs/missing.py --workdir={tmp}/w", 2, "no such config file", "config file that does not exist"),
  Case(TRAIN, "--workdir={tmp}/w", 2, "--config is required", "no --config"),
  Case(TRAIN, "--config={bad_config} --workdir={tmp}/w", 2, "syntax error", "config file that does not parse"),
  Case(TRAIN, "--config=configs/tiny.py:atention=linear --workdir={tmp}/w", 2, "unknown config argument 'atention'", "misspelt config argument"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.model.dmodel=32", 2, "unknown config field in --config.model.dmodel; did you mean 'd_model'?", "misspelt override field"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.seq_len=abc", 2, "invalid literal for int()", "override of the wrong type"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.seq_len=-5", 2, "data.seq_len=-5 must be a positive integer", "negative sequence length"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.batch_size=0", 2, "data.batch_size=0 must be a positive integer", "zero batch size"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.total_steps=0", 2, "total_steps=0 must be a positive integer", "zero steps"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.seq_len=10", 2, "MQAR cannot fit", "task that does not fit the sequence"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.task=wikitext", 2, "data.task='wikitext' is unknown", "unknown data task"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.model.num_heads=3", 2, "does not divide model.d_model=64", "heads that do not divide d_model"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.model.attention=flash", 2, "unknown attention variant(s) ['flash']", "unknown variant"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.optim.grad_accum_steps=3", 2, "does not split into optim.grad_accum_steps=3", "batch that does not split into microbatches"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.optim.lr=-0.1", 2, "optim.lr=-0.1 must be positive", "negative learning rate"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.model.attention=nats_l --config.data.pack=True", 2, "needs documents that start on block boundaries", "packed NAtS-L rows not aligned to its blocks"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.task=tfds --config.data.tfds_name=text_corpus --config.data.data_dir={{empty}} --config.data.vocab_size=257 --config.model.vocab_size=257", 2, "is empty; prepare 'text_corpus' there first", "empty dataset directory"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.data.task=tfds --config.data.tfds_name=my_corpus --config.data.tokenizer={{bad_tokenizer}}", 2, "is not a Hugging Face tokenizer.json", "tokenizer.json that is not a tokenizer"),
  Case(TRAIN, "--config=configs/tiny.py:attention=linear --workdir={run}", 2, "holds checkpoints of a different model (model.attention='softmax' there, 'linear' here)", "workdir of another variant"),
  Case(TRAIN, f"{TINY} --workdir=/proc/attnlab_w", 2, "is not writable", "workdir that cannot be written"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w extra", 2, "unexpected arguments: ['extra']", "stray positional argument"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.init_from={{tmp}}/nowhere", 2, "does not exist; give a workdir", "init_from that does not exist"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.init_from={{fresh}}", 2, "holds no checkpoint yet", "init_from without a checkpoint"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.init_from={{run}} --config.model.d_model=32", 2, "parameters have another shape there", "init_from of another size"),
  Case(TRAIN, f"{TINY} --workdir={{tmp}}/w --config.optim.lr=1e9 --config.optim.warmup_steps=0 --config.total_steps=40 --config.log_every=5 --config.eval_every=0 --config.checkpoint_every=0", 1, "NonFiniteLossError: training loss is", "a run that diverges (runtime)"),
  Case(EVAL, "--workdir={tmp}/nowhere", 2, "does not exist; give a training workdir", "workdir that does not exist"),
  Case(EVAL, "--workdir={empty}", 2, "is not a training workdir", "directory that is not a workdir"),
  Case(EVAL, "--workdir={fresh}", 2, "no checkpoint in", "workdir without a checkpoint"),
  Case(EVAL, "--workdir={run} --seq_lens=64,0", 2, "--seq_lens takes positive integers", "zero length"),
  Case(EVAL, "--workdir={run} --tokens=0", 2, "0 is not a positive integer", "zero tokens"),
  Case(EVAL, "--workdir={run} --config.model.d_model=32", 2, "changes the shapes of the saved run's parameters", "override incompatible with the saved run"),
  Case(SAMPLE, "--workdir={run}", 2, "give --prompt=TEXT or --prompt_ids", "no prompt"),
  Case(SAMPLE, "--workdir={run} --prompt_ids=5,x", 2, "--prompt_ids takes non-negative integer token ids", "prompt id that is not a number"),
  Case(SAMPLE, "--workdir={run} --prompt_ids=5,400", 2, "outside the model's vocabulary of 64", "prompt id outside the vocabulary"),
  Case(SAMPLE, "--workdir={run} --prompt_ids=5 --max_new_tokens=0", 2, "0 is not a positive integer", "zero new tokens"),
  Case(SAMPLE, "--workdir={run} --prompt_ids=5 --temperature=-1", 2, "-1.0 is not a non-negative number", "negative temperature"),
  Case(SAMPLE, "--prompt_ids=5", 2, "--workdir is required", "no --workdir"),
  Case(ANALYZE, "--workdir={run} --step=7", 2, "no checkpoint at step 7", "checkpoint step that does not exist"),
  Case(ANALYZE, "--workdir={run} --layers=5", 2, "the model has layers 0..1", "layer that does not exist"),
  Case(ANALYZE, "--workdir={run} --batch=0", 2, "0 is not a positive integer", "zero batch"),
  Case(ANALYZE, "--workdir={tmp}/nowhere", 2, "does not exist", "workdir that does not exist"),
  Case(PLAN, f"{TINY} --topology=v9-8", 2, "unknown TPU slice 'v9-8'", "unknown TPU slice"),
  Case(PLAN, f"{TINY} --topology=v5p-6", 2, "is not a slice shape this tool knows", "slice size that does not exist"),
  Case(PLAN, "--config=configs/missing.py", 2, "no such config file", "config file that does not exist"),
  Case(PLAN, f"{TINY} --config.model.num_heads=3", 2, "does not divide model.d_model=64", "heads that do not divide d_model"),
  Case(SWEEP, f"{TINY} --sweep=sweeps/missing.py --workdir={{tmp}}/s", 2, "sweep file 'sweeps/missing.py' not found", "sweep file that does not exist"),
  Case(SWEEP, f"{TINY} --sweep={{no_sweep}} --workdir={{tmp}}/s", 2, "defines no get_sweep()", "sweep file without get_sweep"),
  Case(SWEEP, "--config=configs/missing.py --sweep=sweeps/recall.py --workdir={tmp}/s", 2, "no such config file", "config file that does not exist"),
  Case(SWEEP, f"{TINY} --sweep=sweeps/recall.py", 2, "--workdir is required", "no --workdir"),
  Case(COMPARE, "", 2, "give runs to compare", "no runs"),
  Case(COMPARE, "{tmp}/nowhere", 2, "is neither a run nor a directory of runs", "path that does not exist"),
  Case(COMPARE, "{empty}", 2, "no metrics.jsonl under", "directory without runs"),
  Case(PREPARE, "", 2, "give --source_dir=DIR (.txt files) or --source=DIR_OR_GLOB", "no source"),
  Case(PREPARE, "--source_dir={empty} --source={empty}", 2, "give one of --source_dir and --source, not both", "both kinds of source"),
  Case(PREPARE, "--source_dir={tmp}/nowhere", 2, "no such directory", "source directory that does not exist"),
  Case(PREPARE, "--source_dir={empty}", 2, "no .txt files under", "source directory without text"),
  Case(PREPARE, "--source_dir={empty} --train_tokenizer=-5", 2, "-5 is not a non-negative integer", "negative vocabulary"),
  Case(PREPARE, "--source_dir={empty} --text_field=body", 2, "--text_field applies to --source only", "flag of --source with --source_dir"),
  Case(PREPARE, "--source={tmp}/nowhere/*.parquet --data_dir={tmp}/d", 2, "no file matches it as a glob", "source glob that matches nothing"),
  Case(PREPARE, "--source={empty} --data_dir={tmp}/d", 2, "no Parquet or JSON-lines files", "source directory without Parquet or JSON lines"),
  Case(PREPARE, "--source={docs} --data_dir={tmp}/d", 2, "no field 'text'; its fields: body, id", "missing text field"),
  Case(PREPARE, "--source={docs} --text_field=id --data_dir={tmp}/d", 2, "field 'id' holds a number, not a string", "text field that is not a string"),
  Case(PREPARE, "--source={bad_parquet} --data_dir={tmp}/d", 2, "is not a readable Parquet file", "file that is not Parquet"),
  Case(PREPARE, "--source={docs} --text_field=body --dataset_name=lm1b --data_dir={tmp}/d", 2, "is a dataset of tfds's catalogue", "dataset name of the tfds catalogue"),
  Case(PREPARE, "--source={docs} --text_field=body --train_tokenizer=100 --tokenizer_kind=hf --data_dir={tmp}/d", 2, "too small for a hf tokenizer", "vocabulary too small for a BPE"),
  Case(CONVERT, "--workdir={tmp}/w", 2, "give one of --from_hf=DIR", "neither --from_hf nor --to_hf"),
  Case(CONVERT, "--from_hf={tmp}/nowhere --workdir={tmp}/w", 2, "no such directory", "checkpoint directory that does not exist"),
  Case(CONVERT, "--from_hf={empty} --workdir={tmp}/w", 2, "holds no config.json", "directory without config.json"),
  Case(CONVERT, "--from_hf={hf_mixtral} --workdir={tmp}/w", 2, "unsupported architecture 'MixtralForCausalLM'", "architecture the trunk does not compute"),
  Case(CONVERT, "--from_hf={hf_yarn} --workdir={tmp}/w", 2, "rope_scaling of type 'yarn' is not supported", "RoPE scaling"),
  Case(CONVERT, "--to_hf={tmp}/out --workdir={run}", 2, "model.canon_conv=4: Llama-family models have no Canon conv", "run that is not Llama-shaped"),
  Case(CONVERT, "--to_hf={tmp}/out --workdir={tmp}/nowhere", 2, "does not exist; give a training workdir", "workdir that does not exist"),
  Case(REPORT, "--targets=h200", 2, "unknown --targets ['h200']", "unknown target"),
  Case(REPORT, "--seq_lens=2k", 2, "--seq_lens/--head_dims take integers", "length that is not a number"),
  Case(REPORT, "--from_json={tmp}/nowhere.jsonl", 2, "no such file", "results file that does not exist"),
]  # fmt: skip


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
  """The placeholders' paths; {run} is trained once per worker."""
  from attnlab import trainer

  from .conftest import tiny_config

  root = tmp_path_factory.mktemp("cli")
  run = root / "run"
  trainer.train_and_evaluate(tiny_config(total_steps=4, eval_every=0), str(run))
  fresh = root / "fresh"
  fresh.mkdir()
  shutil.copy(run / "config.json", fresh / "config.json")
  (root / "empty").mkdir()
  (root / "bad_config.py").write_text("def get_config(:\n")
  (root / "no_sweep.py").write_text("SWEEP = []\n")
  (root / "docs.jsonl").write_text('{"body": "To be, or not to be", "id": 1}\n')
  (root / "bad.parquet").write_text("this is not Parquet\n")
  (root / "bad_tokenizer.json").write_text('{"vocab": []}\n')
  llama = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
  )  # fmt: skip
  for name, config in (
    ("hf_mixtral", dict(llama, architectures=["MixtralForCausalLM"], model_type="mixtral")),
    ("hf_yarn", dict(llama, rope_scaling={"rope_type": "yarn", "factor": 8.0})),
  ):
    (root / name).mkdir()
    (root / name / "config.json").write_text(json.dumps(config))
  return {
    "run": str(run),
    "fresh": str(fresh),
    "empty": str(root / "empty"),
    "bad_config": str(root / "bad_config.py"),
    "no_sweep": str(root / "no_sweep.py"),
    "docs": str(root / "docs.jsonl"),
    "bad_parquet": str(root / "bad.parquet"),
    "bad_tokenizer": str(root / "bad_tokenizer.json"),
    "hf_mixtral": str(root / "hf_mixtral"),
    "hf_yarn": str(root / "hf_yarn"),
    "root": str(root),
  }


def table_row(case: Case, line: str) -> str:
  """The README row: the command with placeholders, the status, the line."""
  command = f"python -m {case.program} {case.args}".strip()
  return f"| {case.what} | `{command}` | {case.code} | `{line}` |"


def _unplace(text: str, places: dict[str, str], tmp: str) -> str:
  """Paths back to their placeholders, so the README row does not depend on
  where the test ran."""
  for name, path in sorted(places.items(), key=lambda kv: -len(kv[1])):
    if name != "root":
      text = text.replace(path, "{" + name + "}")
  return text.replace(tmp, "{tmp}")


def run_case(
  case: Case, places: dict[str, str], tmp: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
  args = case.args.format(tmp=tmp, **places).split()
  result = subprocess.run(
    [sys.executable, "-m", case.program, *args],
    cwd=REPO, capture_output=True, text=True, timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )  # fmt: skip
  lines = [line for line in result.stderr.splitlines() if line.strip() and not NOISE.match(line)]
  return result, lines


def readme_rows() -> set[str]:
  text = (REPO / "README.md").read_text()
  return {line for line in text.splitlines() if line.startswith("| ")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_ends_in_one_line(case, places, tmp_path):
  result, lines = run_case(case, places, str(tmp_path))
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in lines if ": error: " in line]
  # A usage error is the only line; a runtime failure ends the run's own output.
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  assert case.code == 1 or len(lines) == 1, result.stderr[-3000:]
  line = lines[0 if case.code == 2 else -1]
  assert line.startswith(f"{case.program}: error: "), line
  assert case.expect in line, line
  assert result.returncode == case.code, (result.returncode, line)
  row = table_row(case, _unplace(line, places, str(tmp_path)))
  if os.environ.get(TABLE_DIR_ENV):
    with open(os.path.join(os.environ[TABLE_DIR_ENV], case.id), "w") as f:
      f.write(row)
  else:
    assert row in readme_rows(), f"README row stale; run python -m tests.cli_table\n{row}"


def test_case_ids_are_unique():
  ids = [c.id for c in CASES]
  assert len(ids) == len(set(ids))


def test_verbose_shows_the_traceback(places, tmp_path):
  """--verbose (and ATTNLAB_VERBOSE=1) keep Python's own report for bug reports."""
  args = ["--workdir=" + str(tmp_path / "nowhere"), "--verbose"]
  result = subprocess.run(
    [sys.executable, "-m", EVAL, *args], cwd=REPO, capture_output=True, text=True,
    timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )  # fmt: skip
  assert result.returncode == 1 and "Traceback" in result.stderr
  assert "PathError: workdir" in result.stderr
