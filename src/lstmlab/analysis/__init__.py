"""A look inside: what the LSTM does per time step, recorded (``recording``: gates, states, probabilities) and
drawn (``gates``: the figure of one image read step by step; ``figures``: a run's curves, confusion matrix and
mistakes, and the helpers every figure uses)."""
