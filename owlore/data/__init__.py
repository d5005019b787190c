"""Fine-tuning data: prompt formatting, dataset loading/tokenisation, and the synthetic demo task set."""

from owlore.data.demo_tasks import DEMO_TASKS, build_demo_tasks, write_demo_tasks
from owlore.data.formatting import build_prompt

__all__ = ["DEMO_TASKS", "build_demo_tasks", "build_prompt", "write_demo_tasks"]
