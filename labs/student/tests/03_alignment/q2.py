OK_FORMAT = True

test = {   'name': 'q2',
    'points': 1,
    'suites': [   {   'cases': [{'code': '>>> assert isinstance(dpo_by_hand, float) and 0 < dpo_by_hand < 2 * np.log(2)\n', 'hidden': False, 'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
