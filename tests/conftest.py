import os

from hypothesis import HealthCheck, settings

# "ci": few, fixed-seed examples so the suite stays well under its time budget on 2 cores;
# "dev": more examples for a longer local hunt (HYPOTHESIS_PROFILE=dev pytest).
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
