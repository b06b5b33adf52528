import sys

from opd_tasks.stages import reference_markdown

sys.stdout.write(reference_markdown())
