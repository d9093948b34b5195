"""Ray only: Ray Train glue, Tune sweeps, Ray Jobs, dashboard metrics, calibration."""
