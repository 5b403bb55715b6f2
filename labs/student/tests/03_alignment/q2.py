OK_FORMAT = True

test = {   'name': 'q2',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q2', 'llmlab.align.dpo_loss', 'llmlab.align.bradley_terry_loss'):\n"
                                               '...     assert dpo_by_hand == dpo_loss_by_hand(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA)\n'
                                               '...     assert abs(dpo_loss_by_hand([-5.0], [-7.0], [-5.0], [-7.0], 0.5) - np.log(2)) < 1e-09\n'
                                               '>>> assert isinstance(dpo_by_hand, float) and 0 < dpo_by_hand < 2 * np.log(2)\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
