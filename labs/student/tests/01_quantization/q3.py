OK_FORMAT = True

test = {'name': 'q3', 'points': 1, 'suites': [{'cases': [{'code': '>>> assert float(int8_gap_mb) > 0\n', 'hidden': False, 'locked': False}], 'scored': True, 'setup': '', 'teardown': '', 'type': 'doctest'}]}
