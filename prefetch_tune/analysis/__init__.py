"""Reading what ran: Ascend profiler exports, overlap verdicts, calibration, trace export."""
