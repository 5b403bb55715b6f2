OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [{'cases': [{'code': '>>> assert isinstance(kv_bytes, int) and kv_bytes > 0\n', 'hidden': False, 'locked': False}], 'scored': True, 'setup': '', 'teardown': '', 'type': 'doctest'}]}
