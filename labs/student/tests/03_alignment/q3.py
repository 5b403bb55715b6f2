OK_FORMAT = True

test = {   'name': 'q3',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> steady = [{'step': s, 'rm score': 2.0, 'gold reward': 0.5} for s in (0, 5, 10)]\n"
                                               '>>> assert divergence_step_of(steady) is None\n'
                                               '>>> assert divergence_step == divergence_step_of(ppo_track)\n'
                                               ">>> assert divergence_step is None or divergence_step in [h['step'] for h in ppo_track]\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
