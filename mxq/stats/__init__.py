"""Router statistics and super experts from calibration text; see docs/stats.md."""
from .cache import model_hash
from .collect import collect, collect_or_load
from .observer import RouterObserver
from .report import write_report
from .router_stats import RouterStats
from .super_experts import SuperExpertConfig, find_super_experts

__all__ = ["RouterObserver", "RouterStats", "SuperExpertConfig", "collect", "collect_or_load", "find_super_experts",
           "model_hash", "write_report"]
