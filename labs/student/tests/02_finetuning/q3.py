OK_FORMAT = True

test = {   'name': 'q3',
    'points': 1,
    'suites': [{'cases': [{'code': ">>> assert t4_method in ('full', 'lora', 'qlora')\n", 'hidden': False, 'locked': False}], 'scored': True, 'setup': '', 'teardown': '', 'type': 'doctest'}]}
