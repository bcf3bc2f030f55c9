"""The toy TempoMaster: synthetic clips, the trainer (`tm-export train-toy`), its shipped weights and quality measures.

Above the runtime: the trainer builds its examples with the runtime's own
planner and conditioning code, and the measures read generated videos.
"""
