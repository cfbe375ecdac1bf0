"""The TSV rows that `rrcm certify` and `rrcm predict` write (engine/runner.py) and `rrcm analyze` reads:
the columns of each layout and what each field may hold. Light to import: analyze loads no torch."""

# The time column: str(datetime.timedelta) of the seconds spent per image; groups: days, hours, minutes, seconds.
TIME = r"(?:([0-9]+) days?, )?([0-9]+):([0-9]{2}):([0-9]{2}(?:\.[0-9]+)?)"

HEADERS = {
    "certify": "idx\tlabel\tpredict\tradius\tcorrect\ttime",
    "predict": "idx\tlabel\tpredict\tcorrect\ttime",
    "adaptive": "idx\tlabel\tpredict\tradius\tcorrect\tsamples\ttime",  # certify --adaptive
    "radius": "idx\tlabel\tpredict\tcertified\tsamples\ttime",  # certify --radius
    # several sigmas, cascaded (engine/cascade.py): samples over all stages run, and the sigma of the stage that
    # answered ("-" where none did)
    "cascade": "idx\tlabel\tpredict\tradius\tcorrect\tsamples\tsigma\ttime",
    "radius-cascade": "idx\tlabel\tpredict\tcertified\tsamples\tsigma\ttime",  # certify --radius
    "predict-cascade": "idx\tlabel\tpredict\tcorrect\tsamples\tsigma\ttime",
}

# What each TSV column may hold; a resumed file with anything else is refused.
FIELDS = {"idx": "[0-9]+", "label": "[0-9]+", "predict": "-1|[0-9]+", "radius": r"[0-9]+(\.[0-9]+)?",
          "correct": "[01]", "certified": "[01]", "samples": "[0-9]+", "sigma": r"-|[0-9.]+(e[-+][0-9]+)?",
          "time": TIME}
