"""The EgoVLPv2 trainer, installed as `egovlp_deploy.trainer` (EgoNCE + MLM + VTM with hard negatives;
arrives with the trainer issue)."""
