"""One thin module per DVC stage of dvc.yaml; the logic lives in unite/."""
