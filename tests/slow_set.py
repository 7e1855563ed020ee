"""The default run's time budget: heavy checks moved to the ``slow`` set (issue 21).

Each default suite must finish in under 10 minutes on 2 cores (``.ci/run`` prints it).  The first
tier below took 7 s or more each in a two-worker run of the whole suite (``pytest -n 2
--durations=0``, Python 3.11, cold compilation cache: 838 of its 1881 test-seconds); the second
(4-7 s each: six of the nine phi x sigma combinations, eight of the twelve learner x family steps,
two of four links, ...) was added when the default run still took 625 s of wall time.  They are studies (recoveries on simulated data, seeds, oracles), timing,
memory and compilation claims, second parametrisations, or heavy exact checks whose idea a cheaper
default test also checks (e.g. NUTS against an exact posterior runs by default on the mixed
engine, eight schools and a 1e6-scaled response; the centred, learned-noise and logistic NUTS
checks are here).  They are not skipped: ``pytest -m slow`` runs them with the long studies, and
``pytest -m ""`` runs everything.  A heavy check kept in the default run covers each idea once:
the docs' code blocks, the multi-process refusals, compile-once, every learner's info, NUTS
against exact answers, the Laplace and quadrature marginals, the comparison's two engines and its
command line, the lecture methods' and sigma-Reptile's exact tests, and one example end to end.

Entries are node ids (a file's path alone moves the whole file; an id without its ``[...]`` every
parametrisation); ``conftest.py`` marks them and, in a run of the whole suite, ``test_slow_set.py`` refuses an entry
that matches no collected test (a renamed test would otherwise return to the default run).
"""

import pytest

# where conftest.py leaves the entries that matched no test of a whole-suite run (None in a run
# given paths); tests/test_slow_set.py fails on them, naming them, in whichever worker runs it
STALE_ENTRIES = pytest.StashKey[list]()

SLOW_IN_DEFAULT_RUN = (
    "tests/claims/test_fewshot_learners.py",
    "tests/claims/test_memory.py",
    "tests/claims/test_nuts_time.py",
    "tests/claims/test_appendix_b.py::test_joint_map_collapses_when_sigma_is_small_but_pll_does_not",
    "tests/claims/test_appendix_b.py::test_pll_root_is_the_truth_and_joint_map_root_is_biased",
    "tests/claims/test_compile_once.py::test_a_second_process_compiles_nothing",
    "tests/claims/test_consistency.py::test_estimators_match_closed_forms_on_the_toy",
    "tests/claims/test_eight_schools.py::test_fission_pll_closed_form_matches_library_monte_carlo",
    "tests/claims/test_glmm_families.py::test_a_saddle_is_flagged_and_warned_about",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[fo_m_maml-binomial]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[fomaml-poisson]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[imaml-binomial]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[m_maml-poisson]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[m_shrinkage_map-poisson]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[m_sigma_imaml-binomial]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[shrinkage-poisson]",
    "tests/claims/test_glmm_families.py::test_every_learner_takes_finite_steps_on_binomial_and_poisson_tasks[shrinkage_map-binomial]",
    "tests/claims/test_glmm_families.py::test_implicit_gradient_of_the_laplace_and_agq_marginals_equals_finite_differences",
    "tests/claims/test_glmm_families.py::test_m_shrinkage_learns_the_smaller_sigma_of_a_binomial_slope",
    "tests/claims/test_glmm_families.py::test_nuts_on_a_random_intercept_logistic_model_agrees_with_quadrature",
    "tests/claims/test_glmm_families.py::test_student_t_type2_ml_learns_its_scale_and_degrees_of_freedom",
    "tests/claims/test_memory.py::test_implicit_memory_is_flat_in_k[implicit]",
    "tests/claims/test_mixed_models.py::test_noise_correlation_and_group_coefficients_recovered_on_simulated_data",
    "tests/claims/test_mixed_models.py::test_uncorrelated_effects_and_unpooled_slope_match_statsmodels",
    "tests/claims/test_mixed_posterior.py::test_nuts_with_learned_noise_and_correlation_matches_quadrature",
    "tests/claims/test_type2_scale.py::test_chunked_objective_equals_unchunked_and_per_observation[ML]",
    "tests/claims/test_type2_scale.py::test_chunked_objective_equals_unchunked_and_per_observation[REML]",
    "tests/claims/test_type2_scale.py::test_mle_reference_is_least_squares",
    "tests/claims/test_type2_scale.py::test_statistics_log_marginal_equals_per_observation_and_dense[everything]",
    "tests/studies/test_lme4_crossed_nested.py::test_insteval_crossed_against_mixedlm_and_published_deviance",
    "tests/test_crossfit.py::test_crossfit_sampler_repeats_each_task_with_independent_splits_and_runs_under_fit",
    "tests/test_crossfit.py::test_crossfitting_shrinks_the_spread_of_the_pll_sigma_over_seeds",
    "tests/test_families.py::test_randomised_pit_interval_coverage_and_brier",
    "tests/test_inner_solvers.py::test_curvature_proximal_steps_and_prior_scaled_lbfgs_reach_the_map",
    "tests/test_inner_solvers.py::test_maml_reports_the_stationarity_of_its_steps_and_never_warns",
    "tests/test_inner_solvers.py::test_newton_and_lbfgs_reach_the_closed_form_map_where_sgd_does_not[simulated]",
    "tests/test_inner_solvers.py::test_newton_and_lbfgs_reach_the_closed_form_map_where_sgd_does_not[sleepstudy]",
    "tests/test_shrinkage_report.py::test_predictive_scores_match_scipy",
    "tests/unit/learners/test_base.py::test_bilevel_hypergradients_equal_finite_differences_of_the_exact_pll[M-Shrinkage]",
    "tests/unit/learners/test_base.py::test_bilevel_hypergradients_equal_finite_differences_of_the_exact_pll[M-sigma-iMAML]",
    "tests/unit/learners/test_base.py::test_eq4_hypergradient_uses_the_full_prior_covariance",
    "tests/unit/learners/test_base.py::test_maml_meta_gradient_for_noise_beta_gamma_matches_finite_differences[True]",
    "tests/unit/learners/test_base.py::test_reptile_and_shrinkage_map_learn_the_extra_sites",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[map-exact]",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[map-fixed]",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[pll-eq4]",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[pll-fixed]",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[reptile-eq4]",
    "tests/unit/learners/test_bilevel.py::test_each_combination_steps_along_its_closed_form[reptile-exact]",
    "tests/unit/learners/test_learned_optimizer.py::test_iterates_equal_an_independent_loop_and_the_inner_solver",
    "tests/unit/learners/test_maml.py::test_adaptive_inner_optimiser_needs_eps_root",
    "tests/unit/learners/test_maml.py::test_rematerialised_inner_loop_gives_the_same_step",
    "tests/unit/learners/test_minibatch.py::test_a_minibatched_learner_draws_from_its_key_and_adapts_to_other_shots",
    "tests/unit/learners/test_minibatch.py::test_padding_is_never_drawn",
    "tests/unit/learners/test_network_libraries.py::test_protonet_writes_the_prototype_head_into_any_library_s_parameters[nnx_net]",
    "tests/unit/learners/test_param_predict.py::test_class_weight_predictor_starts_at_protonet_and_never_trains_the_features",
    "tests/unit/learners/test_param_predict.py::test_set_encoder_adapt_is_the_prediction_and_fine_tunes_from_it",
    "tests/unit/learners/test_param_predict.py::test_set_encoder_reaches_the_best_predictor_of_its_width_and_the_bayes_loss[2]",
    "tests/unit/learners/test_shrinkage.py::test_m_shrinkage_separates_the_two_sigma_groups_and_reaches_the_oracle",
    "tests/unit/learners/test_sigma_imaml.py::test_appendix_b_exact_and_eq4_sigma_gradients_share_their_root",
    "tests/unit/learners/test_sigma_imaml.py::test_cg_equals_the_dense_solve[scan-preconditioned]",
    "tests/unit/learners/test_sigma_imaml.py::test_imaml_runs_through_fit_and_evaluate",
    "tests/unit/learners/test_sigma_imaml.py::test_shrinkage_with_the_exact_hypergradient_reaches_the_pll_optimum",
    "tests/unit/learners/test_sigma_reptile.py::test_sigma_step_fixed_point_is_the_closed_form_one[eq4]",
    "tests/unit/mixed/test_numpyro_model.py::test_a_response_scaled_by_a_million_gives_the_posterior_times_a_million",
    "tests/unit/mixed/test_numpyro_model.py::test_priors_are_checked_against_the_posterior",
    "tests/unit/mixed/test_numpyro_model.py::test_the_numpyro_log_joint_is_the_host_engines_at_random_points[binomial-cloglog]",
    "tests/unit/mixed/test_numpyro_model.py::test_the_numpyro_log_joint_is_the_host_engines_at_random_points[binomial-probit]",
    "tests/unit/mixed/test_numpyro_model.py::test_the_numpyro_log_joint_is_the_host_engines_at_random_points[gaussian-None]",
    "tests/unit/models/test_fewshot.py::test_convnet_matches_numpy_and_has_one_module_per_layer[lax]",
    "tests/unit/models/test_linear.py::test_type2_ml_recovers_phi_and_sigma",
    "tests/unit/models/test_swirl.py::test_grid_predictive_is_the_exact_posterior_predictive",
    "tests/unit/models/test_swirl.py::test_likelihood_and_inner_objective_match_numpy",
    "tests/unit/models/test_swirl.py::test_mle_is_the_likelihood_maximum_and_its_expected_loss",
    "tests/unit/models/test_swirl.py::test_oracle_finds_the_global_map_and_the_posterior_mean",
    "tests/unit/test_batched_spd.py::test_derivatives_equal_finite_differences_to_second_order",
    "tests/unit/test_distributed.py::test_two_processes_give_the_single_process_run",
    "tests/unit/test_inner.py::test_shrinkage_meta_step_takes_exactly_k_inner_steps",
    "tests/unit/test_laplace.py::test_agq_and_laplace_equal_the_hand_formula[1]",
    "tests/unit/test_laplace.py::test_agq_and_laplace_equal_the_hand_formula[4]",
    "tests/unit/test_laplace.py::test_agq_with_many_nodes_is_the_integral",
    "tests/unit/test_laplace.py::test_laplace_posterior_of_a_linear_gaussian_task_is_exact",
    "tests/unit/test_linear_gaussian.py::test_groups_sum_their_tasks_log_marginals_exactly",
    "tests/unit/test_posterior.py::test_arviz_conversion_names_task_param_and_module_dims[centred]",
    "tests/unit/test_posterior.py::test_full_bayes_importance_draws_are_consistent_on_the_linear_domain",
    "tests/unit/test_posterior.py::test_full_bayes_laplace_mixture_equals_exact_importance_weights",
    "tests/unit/test_posterior.py::test_laplace_equals_exact_posterior_and_evidence",
    "tests/unit/test_posterior.py::test_nuts_with_fixed_sigma_matches_closed_form_posterior[centred]",
    "tests/unit/test_posterior.py::test_nuts_with_fixed_sigma_matches_closed_form_posterior[noncentred]",
    "tests/unit/test_posterior.py::test_predictive_scores_from_draws_match_the_exact_predictive",
)
