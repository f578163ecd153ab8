"""Benchmark construction: counterfactual targets, rephrases, image neighbours, multi-hop and
adversarial questions, human review, composed into pipelines (``mmke build pipeline FILE``).

Each step is a registered function over a build folder (``mmke build STEP OUT key=value`` runs
one); ``examples/pipelines/`` holds the world's own pipeline and a medical MCQ one.
"""

from mmke.data.build.pipeline import Context, Pipeline, Step, open_draft, run_pipeline, run_step

__all__ = ["Context", "Pipeline", "Step", "open_draft", "run_pipeline", "run_step"]
