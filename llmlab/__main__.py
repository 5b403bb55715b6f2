from llmlab.env import doctor

raise SystemExit(doctor())
