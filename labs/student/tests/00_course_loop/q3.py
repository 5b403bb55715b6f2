OK_FORMAT = True

test = {   'name': 'q3',
    'points': 1,
    'suites': [{'cases': [{'code': '>>> assert best_chat_kind in data.EXACT_TASKS\n', 'hidden': False, 'locked': False}], 'scored': True, 'setup': '', 'teardown': '', 'type': 'doctest'}]}
