"""Evaluation: tasks (how answers are scored), the runner (generate, score, measure cost), the
comparison against prompting baselines and the report."""
from tunelab.evaluate.runner import RunResult, evaluate, load_examples, loss_metrics, run_task
from tunelab.evaluate.tasks import (TASKS, Example, Task, auto_task_name, examples_from,
                                    final_number, make_task, normalize_answer)

__all__ = ["evaluate", "run_task", "loss_metrics", "load_examples", "RunResult", "TASKS", "Task",
           "Example", "make_task", "auto_task_name", "examples_from", "final_number",
           "normalize_answer"]
