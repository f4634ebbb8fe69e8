"""Faithfulness evaluation (DSG / TIFA-style question answering): selma.v1.EvaluationService.

Modules, in the order data flows:

* ``types``      the shared data model: benchmark items, questions, answers, scores.
* ``dsg``        DSG-1k (shipped under ``data/``), the dependency rule, per-prompt and micro averages,
                 the answers-file format of ``selma eval dsg-score``.
* ``questions``  questions for new prompts, written by an LLM backend (selma.llm)
                 (tuples → dependencies → questions; multiple-choice for TIFA).
* ``tifa``       TIFA-style multiple-choice scoring with sentence-embedding choice mapping.
* ``vqa``        visual-question-answering backends: transformers models, OpenAI-compatible
                 vision chat, the tiny test model.
* ``report``     tables, PNG charts and the HTML page with side-by-side image grids.
* ``runner``     one evaluation: render every target with identical seeds (through ServingService),
                 answer, score, search merge weights, publish the eval_report artifact.
* ``core``       validation and jobs behind the Evaluation RPCs (launched like trainers).
* ``cli``        ``selma eval ...``.
"""
