"""deeppcr under torch.distributed: DDP's graph split kept chain-whole (`ddp.py`), collectives declined in
chains (`passes/chains/collectives.py` names them), and layer-parallel chains solved across the
ranks of a process group (`layer_parallel.py`)."""

from .chain_op import register_process_group
from .ddp import DDPSplitReport, clear_ddp_reports, ddp_reports, explain_ddp

__all__ = ["DDPSplitReport", "ddp_reports", "clear_ddp_reports", "register_process_group", "explain_ddp"]
