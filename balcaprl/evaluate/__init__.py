"""Caption evaluation: captions of a dataset split by a model, then metrics, judge-based evaluations,
``report.json`` / ``report.md`` / plots.

Generation half (`run`): `generate_and_evaluate` loads a split (`balcaprl.data.load_caption_dataset`), captions it
with a checkpoint or LoRA adapter (`balcaprl.generation.caption_dataset`: batched, greedy or sampled, appended to
``captions.jsonl`` batch by batch, so an interrupted run resumes where it stopped; the model and settings are
recorded in ``generation.json`` and a rerun with different ones is refused unless told to overwrite), then scores
them like the scoring half does.

Scoring half (`harness`). Input: captions already produced, as records ``{"id": str, "caption": str, "references":
[str, ...], "image": PIL image or path (optional), ...extra columns}`` (`load_captions` reads them from JSONL), or a
COCO results file ``[{"image_id", "caption"}]`` with a COCO captions or Karpathy JSON for the references
(`load_coco_results`, `inputs`). Entry points: `evaluate_captions` (sync) / `evaluate_captions_async`, both taking
one `EvaluationOptions` (or its fields as keywords), and `compare_reports` for model-vs-model tables and plots.
``balcaprl evaluate [run|score|compare] ...`` (or ``python -m balcaprl.evaluate``) runs them from the command line
(`cli`); a data problem there is one ``error:`` line naming file, line/row and field, exit status 2.

Sections of a report (each can be switched off; what is skipped and why is written into the report's notes):

- **classic** (`classic`) — BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE) computed by pycocoevalcap on
  PTB-tokenised text, the COCO caption evaluation protocol. Without ``java`` on PATH METEOR is skipped and the others
  use `balcaprl.text.simple_tokenize` (NFKC, lower-case, punctuation removed; the ``cider_d`` reward's tokenizer),
  which the report marks because the numbers are then not comparable with published ones. SPICE runs only when its
  Stanford CoreNLP jars are already in pycocoevalcap's ``spice/lib`` (it would download them).
- **length** (`classic`) — words per caption (`balcaprl.length.word_length`: punctuation-only tokens are not words),
  ρ = words / mean reference words and the fraction outside BalCapRL's window [0.5, 2].
- **balcap** (`balcap`) — mean precision P, recall R and linguistic L from the judge rewards of
  `balcaprl.rewards.judged` and b-CapScore = H(P̄, R̄, L̄); any three reward functions can stand in for the judges
  (``balcap_rewards``; ``--exact-world-judges`` uses the synthetic world's exact rewards).
- **dcscore**, **captionqa**, **caparena** (`judge_styles`) — judge-based evaluations in the style of the benchmarks
  the BalCapRL paper reports; their functions document how they follow and where they differ from the original
  protocols. Their numbers are "-style": the papers' data, judges and exact prompts are not reproduced, so do not put
  them in a table next to published DCScore / CaptionQA / CapArena values.

Before anything is generated or scored (`checks`): ``output_dir`` must be writable, and the judge must pass the health
check of ``balcaprl train`` with one request of each kind the evaluation sends. After scoring, a judged metric that no
caption could be scored for is listed in the report's ``unscored`` (null, never 0; the notes give the failure counts
and the judge's fault), and the command line exits 1.

Every judge call goes through `balcaprl.judge.JudgeClient`, so an interrupted evaluation re-run with the same
``judge_cache_dir`` only pays for the calls that had not been answered. Image files are needed (and checked) only
when a judge or reward functions will look at them.

Files written in ``output_dir`` (`report`, `plots`): ``report.json`` (every number, plus per-caption values),
``report.md`` (tables), ``length.png`` (word counts; ρ with the [0.5, 2] window marked) and ``metrics.png`` (bars,
×100); by the generation half also ``captions.jsonl`` and ``generation.json``.
"""

from balcaprl._lazy import lazy_exports

__all__ = [
    "CaptionRecord",
    "EvaluationDataError",
    "EvaluationOptions",
    "compare_reports",
    "evaluate_captions",
    "evaluate_captions_async",
    "generate_and_evaluate",
    "harmonic_mean",
    "load_captions",
    "load_coco_results",
    "load_questions",
    "main",
    "read_caption_input",
    "summary_metrics",
    "write_report",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "evaluate_captions": "harness",
        "evaluate_captions_async": "harness",
        "EvaluationOptions": "harness",
        "generate_and_evaluate": "run",
        "compare_reports": "compare",
        "load_captions": "records",
        "load_questions": "records",
        "CaptionRecord": "records",
        "EvaluationDataError": "records",
        "load_coco_results": "inputs",
        "read_caption_input": "inputs",
        "harmonic_mean": "balcap",
        "write_report": "report",
        "summary_metrics": "report",
        "main": "cli",
    },
)
